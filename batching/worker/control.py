"""The items of batches in Celery's worker state, so ``inspect`` and ``revoke`` see them as they see plain tasks.

Celery's remote-control commands read module globals of ``celery.worker.state``: ``requests`` (id -> request,
``query_task``, ``revoke``), ``active_requests`` (``inspect active``, the worker heartbeat's ``active`` count that
Flower shows, ``revoke``'s "is it running?") and ``total_count`` (``inspect stats``). Each claimed item is
registered as an ``ItemRequest`` — a light stand-in for Celery's ``Request`` with the attributes Celery reads —
in ``requests`` when claimed, in ``active_requests`` when its batch starts, and removed when its batch is settled
or given back. ``state.requests`` holds the strong reference the weak set needs. Claimed items are kept out of
``reserved_requests``: the normal consumer counts that set against its pool size (``worker_disable_prefetch``) and
would stop taking plain tasks while a batch is claimed; ``inspect reserved`` and ``query_task`` are re-registered
(through Celery's ``Panel``) to add them from our own table, and ``active_queues`` to list the batch queues.

Revoke, as Celery does it for a plain task:

- revoked before its batch starts (claimed or still queued): Celery stores REVOKED; the item is taken out of the
  batch and settled REVOKED, never run (``start``);
- ``revoke()`` while its batch runs: Celery leaves a running task alone, and so do we — it ends with its result;
- ``revoke(terminate=True)`` while its batch runs: the item is dropped from the batch — REVOKED is stored at once
  and whatever ``run_batch`` returns for it is discarded (``seal``); the batch itself is not killed, since the
  other items in it were not revoked.

Celery's own ``Request``s enter these sets from its main thread, but also from pool threads (``--pool threads``),
and so do ours from the consumers' threads; a copy the main thread takes meanwhile (``tuple(active_requests)`` on a
broker reconnect or at shutdown, ``inspect active``) would fail with "Set changed size during iteration". The two
weak sets are therefore made to iterate over a snapshot of themselves (``_SnapshotWeakSet``, taken atomically).
"""

from __future__ import annotations

import logging
import threading
import weakref
from _weakrefset import _IterationGuard  # type: ignore[attr-defined]  # WeakSet's own guard
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

    __slots__ = ("__weakref__", "eventer", "request", "sealed", "task", "terminated", "time_start", "worker_pid")
    acknowledged = False
    stamps = None

    def __init__(self, task: Any, request: TaskRequest) -> None:
        self.task = task
        self.request = request
        self.time_start: float | None = None
        self.terminated = False
        self.sealed = False
        self.worker_pid: int | None = None
        self.eventer: Any = None  # set by Celery's Events step on a reconnect; our events have their own dispatcher

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
            "args": (r.argsrepr or repr(r.args)) if safe else r.args,
            "kwargs": (r.kwargsrepr or repr(r.kwargs)) if safe else r.kwargs,
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
                self.task.backend.mark_as_revoked(self.id, reason="terminated", request=self.request,
                                                  store_result=not self.request.ignore_result)
            except Exception as exc:
                logger.warning("batching: could not store REVOKED for terminated task %s: %s", self.id, exc)
        logger.info("batching %s: task %s terminated: dropped from its running batch", self.task.name, self.id)

    def cancel(self, pool: Any = None, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels running requests on a cold shutdown or a lost connection, to have them redelivered; a
        batch is finished (warm shutdown) or recovered by its lease (cold) by its consumer, so nothing to do."""

    def __repr__(self) -> str:
        return f"<ItemRequest {self.task.name}[{self.id}]>"


#: Claimed items whose batch has not started, by id (``inspect reserved``).
_claimed: dict[str, ItemRequest] = {}
#: More reserved items for ``inspect reserved``: those the worker's instance processes report (``remote``).
extra_reserved: list[Callable[[], list[dict[str, Any]]]] = []


def snapshot() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This process's reserved and active items, as ``inspect reserved`` / ``active`` list them."""
    active = [r.info() for r in list(worker_state.active_requests) if isinstance(r, ItemRequest)]
    return [t.info() for t in list(_claimed.values())], active


def reserve(task: Any, batch: Batch, first: int) -> None:
    """Register the items ``batch.items[first:]`` (just claimed) as reserved."""
    add_request, add_claimed, add_tracked = worker_state.requests.__setitem__, _claimed.__setitem__, \
        batch.tracked.append
    for item in batch.items[first:]:
        tracked = ItemRequest(task, item.request)
        add_request(tracked.id, tracked)
        add_claimed(tracked.id, tracked)
        add_tracked(tracked)


def start(batch: Batch, now: float, pid: int) -> None:
    """The batch is about to run: its items become active; those revoked meanwhile are settled REVOKED instead."""
    revoked, add_active, unclaim = worker_state.revoked, worker_state.active_requests.add, _claimed.pop
    keep = []
    for item in batch.items:
        tracked = unclaim(item.request.id, None)
        if tracked is not None:
            tracked.time_start, tracked.worker_pid = now, pid
            add_active(tracked)  # before the revoked check: see ``ItemRequest.terminate`` for why the order matters
        if item.request.id in revoked or (tracked is not None and tracked.terminated):
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
    if not batch.tracked:
        return
    terminated = set()
    with _SEAL:
        for tracked in batch.tracked:
            tracked.sealed = True
            if tracked.terminated:
                terminated.add(tracked.id)
    if terminated:
        for item in batch.items:
            if item.request.id in terminated:
                item.outcome = None  # REVOKED is stored; nothing of the batch's answer for it is


def forget(batch: Batch) -> None:
    """The batch is settled or given back: its items leave the worker state."""
    if not batch.tracked:
        return
    requests, discard_active, unclaim = worker_state.requests, worker_state.active_requests.discard, _claimed.pop
    # Celery's consumer moves active requests into reserved_requests when it reconnects.
    reserved = worker_state.reserved_requests
    for tracked in batch.tracked:
        task_id = tracked.request.id
        if requests.get(task_id) is tracked:
            del requests[task_id]
        if tracked.time_start is None:
            unclaim(task_id, None)
        else:
            discard_active(tracked)
        if reserved.data:
            reserved.discard(tracked)
    batch.tracked.clear()


def forget_task(name: str) -> None:
    """A consumer of task ``name`` was abandoned: whatever it held leaves the worker state (its claims come back
    through their lease, to be claimed and registered again)."""
    requests, discard_active = worker_state.requests, worker_state.active_requests.discard
    for tracked in list(requests.values()):  # one C call: a snapshot, whatever other threads do meanwhile
        if isinstance(tracked, ItemRequest) and tracked.task.name == name:
            if requests.get(tracked.id) is tracked:
                del requests[tracked.id]
            _claimed.pop(tracked.id, None)
            discard_active(tracked)


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
    """``command``, retried if a consumer thread changed what it copies meanwhile (``total_count`` gains a key
    the first time a batched task runs; the weak sets iterate over snapshots)."""

    def run(state: Any, **kwargs: Any) -> Any:
        for _ in range(9):
            try:
                return command(state, **kwargs)
            except RuntimeError:  # "changed size during iteration"
                continue
        return command(state, **kwargs)

    run.__doc__, run.__name__ = command.__doc__, command.__name__
    return run


def _reserved(plain: Callable[..., Any]) -> Callable[..., Any]:
    def reserved(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """List of currently reserved tasks, not including scheduled/active."""
        extra = [info for more in extra_reserved for info in more()]
        return list(plain(state, **kwargs)) + [t.info() for t in list(_claimed.values())] + extra

    return reserved


def _query_task(plain: Callable[..., Any]) -> Callable[..., Any]:
    def query_task(state: Any, ids: Any, **kwargs: Any) -> dict[str, Any]:
        """Query for task information by id."""
        found = plain(state, ids=ids, **kwargs)
        for task_id, (where, info) in list(found.items()):
            if where == "ready" and task_id in _claimed:
                found[task_id] = ("reserved", info)
        wanted = {ids} if isinstance(ids, str) else set(ids or ())
        if wanted - set(found):  # claimed by an instance process: only its report knows them
            for info in (info for more in extra_reserved for info in more()):
                if info.get("id") in wanted and info["id"] not in found:
                    found[info["id"]] = ("reserved", info)
        return found

    return query_task


def _active_queues(state: Any) -> list[dict[str, Any]]:
    """List the task queues a worker is currently consuming from (batch queues included)."""
    listed = _plain_active_queues(state)
    names = {q.get("name") for q in listed}
    return listed + [dict(q.as_dict(recurse=True)) for name, q in sorted(_batch_queues.items()) if name not in names]


_plain_active_queues = celery_control.Panel.data["active_queues"]


class _SnapshotWeakSet(weakref.WeakSet[Any]):
    """A ``WeakSet`` whose iteration works on a copy of its references, taken atomically (one C call)."""

    data: set[Any]  # WeakSet's own: the set of weak references

    def __iter__(self) -> Any:
        with _IterationGuard(self):
            for ref in self.data.copy():
                item = ref()
                if item is not None:
                    yield item


def _install() -> None:
    """Re-register the inspect commands through Celery's own ``Panel`` (same names, aliases and timeouts)."""
    wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "active": _retrying, "stats": _retrying, "reserved": _reserved, "query_task": _query_task,
    }
    for name, wrap in wrappers.items():
        meta = celery_control.Panel.meta[name]
        celery_control.inspect_command(
            name=name, alias=meta.alias, default_timeout=meta.default_timeout, help=meta.help,
            signature=meta.signature, args=meta.args, variadic=meta.variadic,
        )(wrap(celery_control.Panel.data[name]))
    meta = celery_control.Panel.meta["active_queues"]
    celery_control.inspect_command(name="active_queues", help=meta.help)(_active_queues)
    # The same objects, which Celery's modules imported by name: only their iteration changes.
    for weak_set in (worker_state.active_requests, worker_state.reserved_requests):
        if type(weak_set) is weakref.WeakSet:
            weak_set.__class__ = _SnapshotWeakSet


_install()
