"""The items of instance processes in the worker's state, so ``inspect`` and ``revoke`` reach them.

Celery's remote-control commands run in the worker's main process and read its ``celery.worker.state``; a task
with ``instances=N`` claims and runs its items in other processes (``instance``). Each instance process reports
what it holds (``control.snapshot``, a few times a second while it changes), and the worker registers stand-ins:
``RemoteItem`` in ``active_requests`` (``inspect active``, the heartbeat's busy count that Flower shows) and the
reserved ones through ``control.extra_reserved``. ``revoke`` is wrapped (through Celery's ``Panel``) so that the
worker, after doing what it always does, forwards the ids to every instance process, which applies them to its
own state exactly as the worker would (``revoke_here``): an item revoked before its batch starts is settled
REVOKED and never run; ``terminate=True`` drops a running item from its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from celery.worker import control as celery_control
from celery.worker import state as worker_state

from . import control

logger = logging.getLogger(__name__)

#: Called with (task ids, terminate, signal) after every ``revoke`` / ``terminate`` command.
_revoke_listeners: list[Callable[[list[str], bool, Any], None]] = []


class RemoteItem:
    """An item running in an instance process, as Celery's ``active`` command and heartbeat read a request."""

    __slots__ = ("__weakref__", "_info", "id")
    acknowledged = False

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info
        self.id = info["id"]

    @property
    def task_id(self) -> str:
        return self.id

    def info(self, safe: bool = False) -> dict[str, Any]:
        return self._info

    def terminate(self, pool: Any = None, signal: Any = None) -> None:
        """Forwarded to the instance process by the ``revoke`` wrapper; nothing to do here."""

    def cancel(self, pool: Any = None, signal: Any = None, emit_retry: bool = True) -> None:
        """The instance process finishes or gives back its own batches."""


class Reported:
    """What one instance process last reported: its reserved items and stand-ins for its active ones."""

    def __init__(self) -> None:
        self.reserved: list[dict[str, Any]] = []
        self.active: list[RemoteItem] = []  # the strong references the weak set needs
        control.extra_reserved.append(self._reserved)

    def update(self, reserved: list[dict[str, Any]], active: list[dict[str, Any]]) -> None:
        stale, self.active = self.active, [RemoteItem(info) for info in active]
        requests = worker_state.requests
        for item in stale:
            worker_state.active_requests.discard(item)
            if requests.get(item.id) is item:
                del requests[item.id]
        for item in self.active:
            # In ``requests`` too: Celery's revoke then sees a running task and leaves its state alone, as it does
            # for an item running in this process.
            requests[item.id] = item
            worker_state.active_requests.add(item)
        self.reserved = reserved

    def clear(self) -> None:
        """The process ended: what it held comes back through the lease, to be reported again by its claimer."""
        self.update([], [])
        if self._reserved in control.extra_reserved:
            control.extra_reserved.remove(self._reserved)

    def _reserved(self) -> list[dict[str, Any]]:
        return self.reserved


def on_revoke(listener: Callable[[list[str], bool, Any], None]) -> Callable[[], None]:
    """Call ``listener`` after every revoke; returns the function that disconnects it."""
    _revoke_listeners.append(listener)
    return lambda: _revoke_listeners.remove(listener) if listener in _revoke_listeners else None


def revoked_ids() -> list[str]:
    """The ids this worker knows are revoked (mingle included), for an instance process that starts."""
    return list(worker_state.revoked)


def revoke_here(task_ids: Iterable[str], terminate: bool, signal: Any = None) -> None:
    """In an instance process: a revoke the worker received, applied as Celery's ``revoke`` applies it."""
    ids = list(task_ids)
    worker_state.revoked.update(ids)
    if terminate:
        for task_id in ids:
            request = worker_state.requests.get(task_id)
            if isinstance(request, control.ItemRequest):
                request.terminate(None, signal)


def _forward(task_id: Any, terminate: bool, signal: Any) -> None:
    ids = [task_id] if isinstance(task_id, str) else list(task_id or ())
    for listener in list(_revoke_listeners):
        try:
            listener(ids, terminate, signal)
        except Exception:
            logger.exception("batching: forwarding a revoke to the instance processes failed")


def _revoking(plain: Callable[..., Any]) -> Callable[..., Any]:
    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
        """Revoke task by task id (or list of ids)."""
        reply = plain(state, task_id, terminate=terminate, signal=signal, **kwargs)
        _forward(task_id, bool(terminate), signal)
        return reply

    return revoke


def _terminating(plain: Callable[..., Any]) -> Callable[..., Any]:
    def terminate(state: Any, signal: Any, task_id: Any, **kwargs: Any) -> Any:
        """Terminate task by task id (or list of ids)."""
        reply = plain(state, signal, task_id, **kwargs)
        _forward(task_id, True, signal)
        return reply

    return terminate


def _install() -> None:
    """Re-register ``revoke`` and ``terminate`` through Celery's own ``Panel`` (same names, help and arguments)."""
    for name, wrap in (("revoke", _revoking), ("terminate", _terminating)):
        meta = celery_control.Panel.meta[name]
        celery_control.control_command(
            name=name, alias=meta.alias, help=meta.help, signature=meta.signature, args=meta.args,
            variadic=meta.variadic,
        )(wrap(celery_control.Panel.data[name]))


_install()
