"""The batching consumer: three threads per batched task, draining that task's Redis queue in batches.

The data path, top to bottom:

1. fetch thread (``fetch``) — claim the oldest messages (``store``) and sort them (``triage``) until the flush
   policy says the batch should run; while the model is still busy with the previous batch, keep topping this one
   up, so batches fill by themselves under load. It holds at most one batch ahead, so other consumers still get
   work.
2. model thread — merge the batch into one ``run_batch`` call and split its results (``merge``), within the
   task's time limits (``limits``).
3. keeper thread — store every outcome in the result backend (``results``), then finish the claim (``store``):
   after the results, so a crash in between repeats work rather than losing it. Between batches it extends the
   leases of this consumer's claims and re-queues the claims of consumers whose leases ran out.

Writing batch *k*'s results overlaps the model running batch *k+1*, which overlaps claiming batch *k+2*.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu.serialization import prepare_accept_content

from .. import tuning
from ..model import ModelHandle
from ..settings import BatchSettings
from ..store.outage import Outage, Stopped
from ..store.queue import QueueStore
from . import control
from .batch import Batch
from .coalescing import Coalescer
from .events import BatchEvents
from .fetch import STOP as _STOP
from .fetch import FetchThread
from .keeper import Keeper
from .ratelimit import RateLimiter
from .results import ResultWriter, Started
from .runner import ModelRunner
from .signals import TaskSignals
from .triage import Rules
from .tunables import IDLE_POLL_S, MAX_UNSETTLED

if TYPE_CHECKING:
    from ..task import BatchedTask
    from .metrics import Metrics

logger = logging.getLogger(__name__)

#: Put in the keeper's queue by ``retune`` to wake it.
_WAKE: Any = object()


class BatchConsumer(FetchThread):
    """Serves one batched task until ``stop()``; Redis outages are waited out, never fatal."""

    def __init__(
        self,
        app: Any,
        settings: BatchSettings,
        model: ModelHandle,
        *,
        hostname: str = "",
        events_enabled: Callable[[], bool] = lambda: False,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.name = settings.name
        self.consumer_id = f"{hostname or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.rules = Rules(
            task_name=settings.name,
            queue=settings.queue,
            # Content types as kombu's registry checks them ('json' -> 'application/json').
            accept=prepare_accept_content(app.conf.accept_content),
            max_message_bytes=settings.max_message_bytes,
            hostname=hostname,
            ignore_result=settings.ignore_result,
            cost=settings.cost,
        )
        self.outage = Outage(settings.name)
        self.store: QueueStore | None = None
        self.keeper: Keeper | None = None
        self.coalescer: Coalescer | None = None
        self.metrics = metrics
        self.events = BatchEvents(app, hostname, events_enabled)
        self._connection: Any = None
        self._stopping = threading.Event()
        self._abandoned = False
        # The next batch waits in this one-place slot for the model thread, which takes it without waking the
        # fetch thread; the fetch thread tops it up, under the same lock, until it is taken.
        self._slot: Any = None
        self._slot_changed = threading.Condition(threading.Lock())
        # Bounded: when storing results falls behind the model, the model thread waits here, the fetch thread
        # then stops claiming, and nothing piles up in memory (an unbounded queue grew without limit under a
        # fast model).
        self._done: queue.Queue[Any] = queue.Queue(maxsize=MAX_UNSETTLED)
        self.signals = TaskSignals(app, settings.name, sender=self)
        started = Started(ResultWriter(app.backend), hostname) if settings.track_started else None
        self.runner = ModelRunner(settings, model, self._done.put, metrics, signals=self.signals, started=started)
        self._lock = threading.Lock()
        #: Set by ``retune``: the keeper reports the new values at once rather than at its next heartbeat.
        self._retuned = threading.Event()
        self._active: set[str] = set()
        self._threads: list[threading.Thread] = []
        # Set by ``for_task`` (a worker's consumers): the task whose items are registered in Celery's worker state
        # for inspect and revoke (``control``), and its rate limit.
        self.task: BatchedTask | None = None
        self.limiter: RateLimiter | None = None

    @property
    def socket_timeout_s(self) -> float:
        """How long a Redis read may go unanswered before the link counts as dead: longer than the longest blocking
        read (``IDLE_POLL_S``), and a fraction of the lease, so a partition is noticed well before claims expire."""
        return IDLE_POLL_S + max(1.0, min(5.0, self.settings.lease_s / 4))

    @classmethod
    def for_task(cls, task: BatchedTask, **options: Any) -> BatchConsumer:
        """The consumer of a batched task, with the settings the task resolves in this worker."""
        consumer = cls(task.app, task.worker_settings(), task.batching_model, **options)
        consumer.task, consumer.limiter = task, RateLimiter.for_task(task)
        return consumer

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def connect(self) -> QueueStore:
        """Open the queue store on the app's own broker settings; raises ``BrokerError`` if it cannot work."""
        self.store, self._connection = QueueStore.open(self.app, self.settings, socket_timeout_s=self.socket_timeout_s)
        self.store.sync_clock()
        self.store.join_epoch()
        self.coalescer = Coalescer(self.settings, self.store, self.rules) if self.settings.coalesce else None
        self.keeper = Keeper(
            self.app, self.settings, self.store, self.outage, events=self.events, accept=self.rules.accept,
            stop=self._stopping, metrics=self.metrics, socket_timeout_s=self.socket_timeout_s, signals=self.signals,
            coalescer=self.coalescer,
        )
        return self.store

    def start(self) -> None:
        """Connect (failing loudly on a broker that cannot work) and serve in daemon threads."""
        if self.store is None:
            self.connect()
        for name, target in (("fetch", self._fetch_loop), ("model", self._model_loop), ("keeper", self._keeper_loop)):
            thread = threading.Thread(target=target, name=f"batching-{name}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def retune(self, settings: BatchSettings) -> None:
        """Serve with ``settings`` from the next batch on (``batching_set``): one reference swap, which the fetch
        thread reads on every round. Only the batching values may differ: the other threads keep theirs."""
        self.rules = dataclasses.replace(self.rules, cost=settings.cost)  # triage reads the budget from its rules
        self.settings = settings
        self._retuned.set()
        with contextlib.suppress(queue.Full):
            self._done.put_nowait(_WAKE)  # the keeper reports it now; if it is busy, it looks after this batch

    def request_stop(self) -> None:
        self._stopping.set()

    def dead_threads(self) -> list[str]:
        """Names of this consumer's threads that ended although it was not asked to stop (a bug)."""
        if self._stopping.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def abandon(self) -> None:
        """Give up on this consumer without finishing anything: its threads wind down, its heartbeats stop, and
        whatever it claimed is recovered through the lease by the consumer that replaces it."""
        self._abandoned = True
        self._stopping.set()
        if self.task is not None:
            control.forget_task(self.name)
        with self._slot_changed:
            self._slot = _STOP
            self._slot_changed.notify_all()
        with contextlib.suppress(queue.Full):
            self._done.put_nowait(_STOP)

    def stop(self, timeout: float | None = None) -> bool:
        """Warm stop: claim nothing more, give back what has not started, finish and store the batch in hand.

        Returns True if every thread ended within ``timeout``.
        """
        self._stopping.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("batching %s: still busy at shutdown (%s); its claims will be recovered by lease",
                           self.name, ", ".join(alive))
        elif self._connection is not None:
            self._connection.release()
        return not alive

    # -- model thread ------------------------------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            with self._slot_changed:
                while self._slot is None:
                    self._slot_changed.wait()
                batch, self._slot = self._slot, None
                self._slot_changed.notify_all()
            if batch is _STOP:
                self._slot = _STOP  # stay stopped
                self._done.put(_STOP)
                return
            try:
                self.run(batch)
            except BaseException:
                # The model thread must outlive anything a batch does (SystemExit or KeyboardInterrupt raised by
                # a model included). The batch is dropped unsettled: untracked, its lease runs out and any
                # consumer puts its messages back, where delivery counting isolates one that keeps doing this.
                logger.exception("batching %s: running a batch of %d failed; its claim will be recovered by lease",
                                 self.name, len(batch.claim))
                self._untrack(batch)

    def run(self, batch: Batch) -> None:
        """Run the batch's requests through the model and pass every outcome on to the keeper."""
        if self.task is not None:
            control.start(batch, time.time(), os.getpid())  # revoked meanwhile: settled, not run
            if not batch.items:
                self._done.put(batch)
                return
        self.runner.run(batch)

    # -- keeper thread -----------------------------------------------------------------------------------------

    def _keeper_loop(self) -> None:
        beat_s = self.settings.lease_s / 4
        next_beat = 0.0
        while not self._abandoned:
            try:
                item = self._done.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP or self._abandoned:
                break
            if item is not None and item is not _WAKE:
                self._settle(item)
            if time.monotonic() >= next_beat or self._retuned.is_set():
                self._retuned.clear()
                self._maintain()
                next_beat = time.monotonic() + beat_s
        try:
            self._require_keeper().close(self.consumer_id)
        except Exception:
            logger.exception("batching %s: closing the consumer failed", self.name)

    def _maintain(self) -> None:
        with self._lock:
            active = list(self._active)
        try:
            self._require_keeper().maintain(self.consumer_id, active, tuning.encode(self.settings))
        except Exception:
            # Heartbeats must go on: a failure here is logged and the next beat tries again.
            logger.exception("batching %s: heartbeat or recovery failed; trying again next beat", self.name)

    def _settle(self, batch: Batch) -> None:
        try:
            self._require_keeper().settle(batch)
        except Stopped:
            logger.warning("batching %s: stopping while Redis is unreachable; the claim of %d message(s) will be "
                           "recovered by lease", self.name, len(batch.claim))
        except Exception:
            # Never let the keeper die: this batch's claim stays in Redis and its lease (no longer extended)
            # hands it to a consumer again.
            logger.exception("batching %s: settling a batch of %d failed; its claim will be recovered by lease",
                             self.name, len(batch.claim))
        finally:
            self._untrack(batch)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _track(self, batch: Batch) -> None:
        with self._lock:
            self._active.add(batch.claim.claim_id)

    def _untrack(self, batch: Batch) -> None:
        with self._lock:
            self._active.discard(batch.claim.claim_id)
        if self.task is not None:
            control.forget(batch)

    def _require_keeper(self) -> Keeper:
        if self.keeper is None:
            self.connect()
        assert self.keeper is not None
        return self.keeper

    def _require_store(self) -> QueueStore:
        if self.store is None:
            self.connect()
        assert self.store is not None
        return self.store

    def drain(self, max_batches: int = 1000) -> int:
        """Serve synchronously until the queue is empty (tests, scripts); returns messages claimed."""
        total = 0
        for _ in range(max_batches):
            batch = self.collect(idle_timeout_s=0.0)
            if batch is None:
                break
            total += len(batch.claim)
            if batch.items:
                self.run(batch)
            else:
                self._done.put(batch)
            while not self._done.empty():
                if (done := self._done.get_nowait()) is not _WAKE:
                    self._settle(done)
        return total
