"""The batching consumer: three threads per batched task, draining that task's Redis queue in batches.

The data path, top to bottom:

1. fetch thread — claim the oldest messages (``store``) and sort them (``triage``) until the flush policy says
   the batch should run; while the model is still busy with the previous batch, keep topping this one up, so
   batches fill by themselves under load. It holds at most one batch ahead, so other consumers still get work.
2. model thread — merge the batch into one ``run_batch`` call and split its results (``merge``), within the
   task's time limits (``limits``).
3. keeper thread — store every outcome in the result backend (``results``), then finish the claim (``store``):
   after the results, so a crash in between repeats work rather than losing it. Between batches it extends the
   leases of this consumer's claims and re-queues the claims of consumers whose leases ran out.

Writing batch *k*'s results overlaps the model running batch *k+1*, which overlaps claiming batch *k+2*.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.worker import state as worker_state
from kombu.serialization import prepare_accept_content

from .keeper import Keeper
from .metrics import Metrics
from .outage import REDIS_ERRORS, RETRY_MIN_S, Outage, next_backoff
from .runner import ModelRunner
from .store import QueueStore
from .triage import Batch, Rules, triage

if TYPE_CHECKING:
    from .task import BatchedTask

logger = logging.getLogger(__name__)

#: Longest single blocking read while idle, in seconds: bounds how late a stop request or a message on a
#: non-default priority list (Redis can block on one list only) is noticed.
IDLE_POLL_S = 1.0
#: While a batch forms under ``max_delay``, how often it is topped up from Redis, in seconds.
FORM_POLL_S = 0.001
#: While the model is busy, how often the batch in hand is topped up from Redis (doubling while nothing comes).
TOPUP_MIN_S, TOPUP_MAX_S = 0.002, 0.02
#: Batches that may wait for the keeper thread (results to store) before the model thread waits for it.
MAX_UNSETTLED = 2
_STOP: Any = object()


class BatchConsumer:
    """Serves one batched task until ``stop()``; Redis outages are waited out, never fatal."""

    def __init__(
        self,
        task: BatchedTask,
        *,
        hostname: str = "",
        events_enabled: Callable[[], bool] = lambda: False,
        metrics: Metrics | None = None,
    ) -> None:
        self.task = task
        self.config = task.batching
        self.consumer_id = f"{hostname or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.rules = Rules(
            task_name=task.name,
            queue=self.config.queue,
            # Content types as kombu's registry checks them ('json' -> 'application/json').
            accept=prepare_accept_content(task.app.conf.accept_content),
            max_message_bytes=self.config.max_message_bytes,
            hostname=hostname,
            ignore_result=bool(task.ignore_result),
        )
        self.outage = Outage(task.name)
        self.store: QueueStore | None = None
        self.keeper: Keeper | None = None
        self.metrics = metrics
        self._events_enabled = events_enabled
        self._connection: Any = None
        self._stopping = threading.Event()
        # The next batch waits in this one-place slot for the model thread, which takes it without waking the
        # fetch thread; the fetch thread tops it up, under the same lock, until it is taken.
        self._slot: Any = None
        self._slot_changed = threading.Condition(threading.Lock())
        # Bounded: when storing results falls behind the model, the model thread waits here, the fetch thread
        # then stops claiming, and nothing piles up in memory (an unbounded queue grew without limit under a
        # fast model).
        self._done: queue.Queue[Any] = queue.Queue(maxsize=MAX_UNSETTLED)
        self.runner = ModelRunner(task, self._done.put, metrics)
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def connect(self) -> QueueStore:
        """Open the queue store on the app's own broker settings; raises ``BrokerError`` if it cannot work."""
        self.store, self._connection = QueueStore.open(self.task)
        self.keeper = Keeper(
            self.task, self.store, self.outage, hostname=self.rules.hostname, events_enabled=self._events_enabled,
            accept=self.rules.accept, metrics=self.metrics,
        )
        return self.store

    def start(self) -> None:
        """Connect (failing loudly on a broker that cannot work) and serve in daemon threads."""
        if self.store is None:
            self.connect()
        for name, target in (("fetch", self._fetch_loop), ("model", self._model_loop), ("keeper", self._keeper_loop)):
            thread = threading.Thread(target=target, name=f"batching-{name}-{self.task.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self) -> None:
        self._stopping.set()

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
                           self.task.name, ", ".join(alive))
        elif self._connection is not None:
            self._connection.release()
        return not alive

    # -- fetch thread ------------------------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        backoff = RETRY_MIN_S
        while not self._stopping.is_set():
            try:
                batch = self.collect()
                if batch is not None:
                    self._hand_off(batch)
                self.outage.ok()
                backoff = RETRY_MIN_S
            except REDIS_ERRORS as exc:
                self.outage.failed(exc)
            except Exception:
                # A bug of ours must not end the consumer silently: log it, back off, keep serving.
                logger.exception("batching %s: unexpected error while claiming; continuing", self.task.name)
            else:
                continue
            self._stopping.wait(backoff)
            backoff = next_backoff(backoff)
        with self._slot_changed:
            if self._slot is not None:
                self._release(self._slot)
            self._slot = _STOP
            self._slot_changed.notify_all()

    def collect(self, idle_timeout_s: float = IDLE_POLL_S) -> Batch | None:
        """Claim and triage messages until the flush policy says the batch should run (``None``: stayed empty)."""
        store = self._require_store()
        batch = Batch(store.new_claim())
        self._track(batch)
        try:
            return self._collect_into(batch, idle_timeout_s)
        except BaseException:
            self._abandon_claim(batch)
            raise

    def _abandon_claim(self, batch: Batch) -> None:
        """Drop a batch whose claim may hold messages we never saw: a claim call whose reply was lost may have
        moved messages into it. Nothing of it is run or finished here; its lease, no longer extended, runs out
        and any consumer puts the whole claim, unseen messages included, back at the front of the queue.
        """
        self._untrack(batch)

    def _collect_into(self, batch: Batch, idle_timeout_s: float) -> Batch | None:
        store = self._require_store()
        policy = self.config.policy
        oldest: float | None = None
        idle_until = time.monotonic() + idle_timeout_s
        while True:
            if self._top_up(batch) and oldest is None:
                oldest = time.monotonic()
            now = time.monotonic()
            wait = policy.wait_s(now, oldest, len(batch.claim))
            if wait is None or (batch.claim and self._stopping.is_set()):
                return batch
            if not batch.claim and (now >= idle_until or self._stopping.is_set()):
                self._untrack(batch)
                return None
            if batch.claim:
                # Forming a batch: poll for the rest of max_delay. A blocking read would be rounded up by Redis,
                # which checks blocked clients' timeouts only on its cron tick (every 100 ms at the default hz).
                self._stopping.wait(min(wait, FORM_POLL_S))
                continue
            timeout = min(wait, IDLE_POLL_S, idle_until - now)
            if batch.claim.next_eta is not None:
                timeout = min(timeout, max(batch.claim.next_eta - time.time(), 0.0))
            store.wait(timeout)

    def _top_up(self, batch: Batch) -> int:
        missing = self.config.policy.batch_size - len(batch.claim)
        if missing <= 0:
            return 0
        claim = batch.claim
        before = len(claim.raws)
        taken = self._require_store().claim(claim, missing)
        if taken:
            triage(batch, claim.raws[before:], self.rules, worker_state.revoked, time.time())
        return taken

    def _hand_off(self, batch: Batch) -> None:
        """Put the batch in the model's slot, and top it up there until the model thread takes it."""
        if not batch.runnable:
            self._done.put(batch)  # nothing to run: settle and finish it straight away
            return
        poll = TOPUP_MIN_S
        with self._slot_changed:
            self._slot = batch
            self._slot_changed.notify_all()
            while self._slot is batch:
                if self._stopping.is_set():
                    return  # the fetch loop gives the slot's batch back
                # Topping up holds the lock for one claim round trip: the model thread may wait that long.
                try:
                    taken = self._top_up(batch)
                except BaseException:
                    self._slot = None  # never run a batch whose claim may hold messages we did not see
                    self._abandon_claim(batch)
                    raise
                poll = TOPUP_MIN_S if taken else min(poll * 2, TOPUP_MAX_S)
                self._slot_changed.wait(poll)

    def _release(self, batch: Batch) -> None:
        """Give a batch that never started back to the front of its queue."""
        if batch.claim:
            try:
                requeued = self._require_store().release([batch.claim.claim_id])
                logger.info("batching %s: gave %d unstarted message(s) back to the queue", self.task.name, requeued)
            except REDIS_ERRORS as exc:
                logger.warning("batching %s: could not give back %d message(s) (%s); their lease will",
                               self.task.name, len(batch.claim), exc)
        self._untrack(batch)

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
            self.run(batch)

    def run(self, batch: Batch) -> None:
        """Run the batch's requests through the model and pass every outcome on to the keeper."""
        self.runner.run(batch)

    # -- keeper thread -----------------------------------------------------------------------------------------

    def _keeper_loop(self) -> None:
        beat_s = self.config.lease_s / 4
        next_beat = 0.0
        while True:
            try:
                item = self._done.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._settle(item)
            if time.monotonic() >= next_beat:
                with self._lock:
                    active = list(self._active)
                self._require_keeper().maintain(self.consumer_id, active)
                next_beat = time.monotonic() + beat_s
        self._require_keeper().close(self.consumer_id)

    def _settle(self, batch: Batch) -> None:
        try:
            self._require_keeper().settle(batch)
        except Exception:
            # Never let the keeper die: this batch's claim stays in Redis and its lease (no longer extended)
            # hands it to a consumer again.
            logger.exception("batching %s: settling a batch of %d failed; its claim will be recovered by lease",
                             self.task.name, len(batch.claim))
        finally:
            self._untrack(batch)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _track(self, batch: Batch) -> None:
        with self._lock:
            self._active.add(batch.claim.claim_id)

    def _untrack(self, batch: Batch) -> None:
        with self._lock:
            self._active.discard(batch.claim.claim_id)

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
            if batch.runnable:
                self.run(batch)
            else:
                self._done.put(batch)
            while not self._done.empty():
                self._settle(self._done.get_nowait())
        return total
