"""Task events for Flower and ``celery events``: the same ``task-*`` events a normal worker sends.

Sent through Celery's own ``EventDispatcher`` (on a connection of our own, since the worker's dispatcher belongs
to its consumer thread), buffered per batch and flushed as one ``task.multi`` publish — not one publish per event.
Whether to send at all is read from the worker's dispatcher before every batch: it follows ``-E``, and Flower's
or ``celery control enable_events``, and survives the consumer restarting after a broker reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from celery import states
from celery.utils.saferepr import saferepr

from .batch import Outcome

logger = logging.getLogger(__name__)


def task_events_enabled(worker: Any) -> bool:
    """True if the worker currently sends task events (``-E`` or ``enable_events``)."""
    dispatcher = getattr(getattr(worker, "consumer", None), "event_dispatcher", None)
    if dispatcher is None or not dispatcher.enabled:
        return False
    return not dispatcher.groups or "task" in dispatcher.groups


class BatchEvents:
    """Buffers one batch's task events and publishes them together."""

    def __init__(self, app: Any, hostname: str, enabled: Callable[[], bool]) -> None:
        self.app = app
        self.hostname = hostname
        self.enabled = enabled
        self._dispatcher: Any = None

    def send_batch(
        self, outcomes: Sequence[Outcome], *, received: float, started: float | None, finished: float
    ) -> None:
        """``task-received`` and ``task-started`` (when it ran) then the final event of every outcome."""
        if not outcomes or not self.enabled():
            return
        try:
            dispatcher = self._get_dispatcher()
            for o in outcomes:
                r = o.request
                if r is None:
                    continue
                dispatcher.send(
                    "task-received", uuid=o.task_id, name=r.task, args=r.argsrepr or saferepr(r.args),
                    kwargs=r.kwargsrepr or saferepr(r.kwargs), root_id=r.root_id, parent_id=r.parent_id,
                    retries=r.retries, eta=r.eta, expires=r.expires, timestamp=received,
                )
                if started is not None and o.state != states.REVOKED:
                    dispatcher.send("task-started", uuid=o.task_id, timestamp=started)  # the dispatcher adds pid
                kind, fields = _final(o, started, finished)
                dispatcher.send(kind, **fields)
            dispatcher.flush()
        except Exception as exc:  # monitoring must never cost a result: drop the events, keep serving
            logger.warning("batching: could not send task events (%s); will reconnect for the next batch", exc)
            self.close()

    def _get_dispatcher(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=self.hostname, enabled=True, buffer_group=["task"],
            )
        return self._dispatcher

    def close(self) -> None:
        if self._dispatcher is not None:
            try:
                self._dispatcher.close()
                self._dispatcher.connection.close()
            except Exception:
                pass
            self._dispatcher = None


def _final(o: Outcome, started: float | None, finished: float) -> tuple[str, dict[str, Any]]:
    fields: dict[str, Any] = {"uuid": o.task_id, "timestamp": finished}
    if o.state == states.SUCCESS:
        fields.update(result=saferepr(o.value), runtime=finished - (started or finished))
        return "task-succeeded", fields
    if o.state == states.REVOKED:
        fields.update(terminated=False, signum=None, expired="expired" in str(o.value))
        return "task-revoked", fields
    fields.update(exception=saferepr(o.value), traceback=o.traceback or "")
    return ("task-retried" if o.state == states.RETRY else "task-failed"), fields
