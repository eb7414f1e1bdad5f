"""The items of batches in Celery's worker state, so ``inspect`` and ``revoke`` see them as they see plain tasks.

Celery's remote-control commands read module globals of ``celery.worker.state``: ``requests`` (id -> request,
``query_task``, ``revoke``), ``reserved_requests`` and ``active_requests`` (``inspect reserved`` / ``active``, the
worker heartbeat's ``active`` count that Flower shows) and ``total_count`` (``inspect stats``). Each claimed item is
registered there as an ``ItemRequest`` — a light stand-in for Celery's ``Request`` with the attributes those
commands read — reserved when claimed, active when its batch starts, and removed when its batch is settled or given
back. ``state.requests`` holds the strong reference the two weak sets need.

Revoke, as Celery does it for a plain task:

- revoked before its batch starts (claimed or still queued): Celery stores REVOKED; the item is taken out of the
  batch and settled REVOKED, never run (``start``);
- ``revoke()`` while its batch runs: Celery leaves a running task alone, and so do we — it ends with its result;
- ``revoke(terminate=True)`` while its batch runs: the item is dropped from the batch — REVOKED is stored at once
  and whatever ``run_batch`` returns for it is discarded (``seal``); the batch itself is not killed, since the
  other items in it were not revoked.

The weak sets are only ever iterated by the worker's main thread while our threads add to them; the inspect
commands that iterate them are re-registered here to retry the copy when a consumer thread changed the set under
them (``RuntimeError: Set changed size during iteration``), and ``active_queues`` also lists the batch queues.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.worker import control as celery_control
from celery.worker import state as worker_state
from kombu import Exchange, Queue

from .batch import Batch, Outcome

if TYPE_CHECKING:
    from .request import TaskRequest

logger = logging.getLogger(__name__)

#: Orders ``ItemRequest.terminate`` (control thread) against ``seal`` (keeper thread): an item is either dropped
#: before its outcome is stored, or terminated too late to matter — never REVOKED and then overwritten.
_SEAL = threading.Lock()


class ItemRequest:
    """One claimed item as Celery's worker state and remote-control commands read a ``Request``."""

    __slots__ = ("__weakref__", "request", "sealed", "task", "terminated", "time_start", "worker_pid")
    acknowledged = False
    stamps = None

    def __init__(self, task: Any, request: TaskRequest) -> None:
        self.task = task
        self.request = request
        self.time_start: float | None = None
        self.terminated = False
        self.sealed = False
        self.worker_pid: int | None = None

    @property
    def id(self) -> str:
        return self.request.id

    task_id = id

    @property
    def name(self) -> str:
        return self.task.name

    def info(self, safe: bool = False) -> dict[str, Any]:
        r = self.request
        return {
            "id": r.id,
            "name": self.task.name,
            "args": r.argsrepr or repr(r.args) if safe else r.args,
            "kwargs": r.kwargsrepr or repr(r.kwargs) if safe else r.kwargs,
            "type": self.task.name,
            "hostname": r.hostname,
            "time_start": self.time_start,
            "acknowledged": False,
            "delivery_info": {"exchange": "", "routing_key": r.delivery_info["routing_key"],
                              "priority": r._props.get("priority"), "redelivered": False},
            "worker_pid": self.worker_pid,
        }

    def terminate(self, pool: Any = None, signal: Any = None) -> None:
        """``revoke(terminate=True)``: drop this item from its batch and store REVOKED now (see the module doc)."""
        with _SEAL:
            if self.sealed or self.terminated:
                return  # its outcome is already being stored: too late, as for a task that just finished
            self.terminated = True
            if self.time_start is None:
                return  # not started: Celery's revoke stored REVOKED, and ``start`` takes it out of the batch
            try:
                self.task.backend.mark_as_revoked(self.id, reason="terminated", request=self.request)
            except Exception as exc:
                logger.warning("batching: could not store REVOKED for terminated task %s: %s", self.id, exc)
        logger.info("batching %s: task %s terminated: dropped from its running batch", self.task.name, self.id)

    def cancel(self, pool: Any = None, signal: Any = None, emit_retry: bool = True) -> None:
        self.terminate(pool, signal)

    def __repr__(self) -> str:
        return f"<ItemRequest {self.task.name}[{self.id}]>"


def reserve(task: Any, batch: Batch, first: int) -> None:
    """Register the items ``batch.items[first:]`` (just claimed) as reserved."""
    add_request, add_reserved = worker_state.requests.__setitem__, worker_state.reserved_requests.add
    for item in batch.items[first:]:
        tracked = ItemRequest(task, item.request)
        add_request(tracked.id, tracked)
        add_reserved(tracked)


def start(batch: Batch, now: float, pid: int) -> None:
    """The batch is about to run: its items become active; those revoked meanwhile are settled REVOKED instead."""
    requests, revoked, add_active = worker_state.requests, worker_state.revoked, worker_state.active_requests.add
    keep = []
    for item in batch.items:
        tracked = requests.get(item.request.id)
        if isinstance(tracked, ItemRequest):
            tracked.time_start, tracked.worker_pid = now, pid
            add_active(tracked)  # before the revoked check: see ``ItemRequest`` for why the order matters
        if item.request.id in revoked or (tracked is not None and getattr(tracked, "terminated", False)):
            batch.settled.append(Outcome(item.request.id, states.REVOKED, TaskRevokedError("revoked"), item.request))
        else:
            keep.append(item)
    if len(keep) != len(batch.items):
        batch.items[:] = keep
    if keep:
        name = keep[0].request.task
        worker_state.total_count[name] += len(keep)
        worker_state.all_total_count[0] += len(keep)


def seal(batch: Batch) -> None:
    """The batch's outcomes are about to be stored: drop those of terminated items; later terminates are no-ops."""
    requests = worker_state.requests
    with _SEAL:
        for item in batch.items:
            tracked = requests.get(item.request.id)
            if isinstance(tracked, ItemRequest):
                tracked.sealed = True
                if tracked.terminated:
                    item.outcome = None  # REVOKED is stored; nothing of the batch's answer for it is


def forget(batch: Batch) -> None:
    """The batch is settled or given back: its items leave the worker state."""
    pop, discard_active = worker_state.requests.pop, worker_state.active_requests.discard
    discard_reserved = worker_state.reserved_requests.discard
    for item in batch.items:
        tracked = pop(item.request.id, None)
        if tracked is not None:
            discard_active(tracked)
            discard_reserved(tracked)
    for outcome in batch.settled:  # items taken out of the batch by ``start``
        tracked = worker_state.requests.get(outcome.task_id)
        if isinstance(tracked, ItemRequest):
            pop(outcome.task_id, None)
            discard_active(tracked)
            discard_reserved(tracked)


# -- remote control ------------------------------------------------------------------------------------------

#: Batch queues served by consumers of this process, by name, for ``inspect active_queues``.
_batch_queues: dict[str, Queue] = {}


def serve_queues(app: Any, names: Iterable[str]) -> None:
    """List ``names`` in ``inspect active_queues`` (as the app declares them, or as the client creates them)."""
    for name in names:
        queue = app.amqp.queues.get(name) if name in app.amqp.queues else None
        _batch_queues[name] = queue if queue is not None else Queue(name, Exchange(name), routing_key=name)


def stop_serving(names: Iterable[str]) -> None:
    for name in names:
        _batch_queues.pop(name, None)


def _retrying(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command``, retried when a consumer thread changed a weak set while the command copied it."""

    def run(state: Any, **kwargs: Any) -> Any:
        for _ in range(9):
            try:
                return command(state, **kwargs)
            except RuntimeError:  # "changed size during iteration"
                continue
        return command(state, **kwargs)

    run.__doc__, run.__name__ = command.__doc__, command.__name__
    return run


def _active_queues(state: Any) -> list[dict[str, Any]]:
    """List the task queues a worker is currently consuming from (batch queues included)."""
    listed = _plain_active_queues(state)
    names = {q.get("name") for q in listed}
    return listed + [dict(q.as_dict(recurse=True)) for name, q in sorted(_batch_queues.items()) if name not in names]


_plain_active_queues = celery_control.Panel.data["active_queues"]


def _install() -> None:
    """Re-register the inspect commands through Celery's own ``Panel`` (same names, aliases and timeouts)."""
    for name in ("active", "reserved", "stats", "query_task"):
        meta = celery_control.Panel.meta[name]
        celery_control.inspect_command(
            name=name, alias=meta.alias, default_timeout=meta.default_timeout, help=meta.help,
            signature=meta.signature, args=meta.args, variadic=meta.variadic,
        )(_retrying(celery_control.Panel.data[name]))
    meta = celery_control.Panel.meta["active_queues"]
    celery_control.inspect_command(name="active_queues", help=meta.help)(_active_queues)


_install()
