"""The fetch thread of a batching consumer: claim messages, sort them, form the next batch, hand it to the model.

It claims the oldest messages (``store``) and sorts them (``triage``) until the flush policy says the batch should
run; while the model is still busy with the previous batch, it keeps topping this one up in the model's one-place
slot, so batches fill by themselves under load. It holds at most one batch ahead, so other consumers still get
work. A mixin of ``BatchConsumer``, whose state (store, slot, stop event, claims in hand) it shares.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.worker import state as worker_state

from ..store.outage import REDIS_ERRORS, Outage, Stopped, with_retries
from ..store.queue import QueueStore
from . import control
from .batch import Batch
from .triage import Rules, triage
from .tunables import FORM_POLL_S, IDLE_POLL_S, TOPUP_MAX_S, TOPUP_MIN_S

if TYPE_CHECKING:
    from ..settings import BatchSettings
    from ..task import BatchedTask
    from .coalescing import Coalescer
    from .ratelimit import RateLimiter
    from .signals import TaskSignals

logger = logging.getLogger(__name__)

#: Put in the model's slot (and the keeper's queue) to tell those threads to end.
STOP: Any = object()


class FetchThread:
    """The fetch thread's half of ``BatchConsumer``."""

    name: str
    settings: BatchSettings
    rules: Rules
    outage: Outage
    task: BatchedTask | None
    limiter: RateLimiter | None
    signals: TaskSignals
    coalescer: Coalescer | None
    _stopping: threading.Event
    _slot: Any
    _slot_changed: threading.Condition
    _done: queue.Queue[Any]

    def _require_store(self) -> QueueStore:
        raise NotImplementedError

    def _track(self, batch: Batch) -> None:
        raise NotImplementedError

    def _untrack(self, batch: Batch) -> None:
        raise NotImplementedError

    def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with_retries(self._fetch_one, self.outage, self._stopping, unexpected="claiming")
            except Stopped:
                break
        with self._slot_changed:
            if self._slot is not None:
                self._release(self._slot)
            self._slot = STOP
            self._slot_changed.notify_all()

    def _fetch_one(self) -> None:
        batch = self.collect()
        if batch is not None:
            self._hand_off(batch)

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
        policy = self.settings.policy
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
            if self.limiter is not None and (limited_s := self.limiter.wait_s()) > 0:
                self._stopping.wait(min(timeout, limited_s))  # not store.wait: it returns at once on a full queue
                continue
            if batch.claim.next_eta is not None:
                timeout = min(timeout, max(batch.claim.next_eta - store.now(), 0.0))
            store.wait(timeout)

    def _top_up(self, batch: Batch) -> int:
        missing = self.settings.policy.batch_size - len(batch.claim)
        if missing <= 0:
            return 0
        if self.limiter is not None and not (missing := self.limiter.grant(missing)):
            return 0
        claim = batch.claim
        before, first = len(claim.raws), len(batch.items)
        taken = self._require_store().claim(claim, missing)
        if self.limiter is not None and taken < missing:
            self.limiter.refund(missing - taken)
        if taken:
            running = len(batch.items)
            # Abandoned ids are looked up (one ZMSCORE) only while some caller of this queue gave up lately.
            store = self._require_store()
            lookup = store.abandoned_among if claim.abandonments else None
            triage(batch, claim.raws[before:], self.rules, worker_state.revoked, store.now(), lookup)
            if self.coalescer is not None:
                self.coalescer.join(batch, claim.raws[before:], running)  # may move some to their owners
            if self.task is not None:
                control.reserve(self.task, batch, first)
            self.signals.received(batch.items, running)
        return taken

    def _hand_off(self, batch: Batch) -> None:
        """Put the batch in the model's slot, and top it up there until the model thread takes it."""
        if not batch.items:
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
                logger.info("batching %s: gave %d unstarted message(s) back to the queue", self.name, requeued)
            except REDIS_ERRORS as exc:
                logger.warning("batching %s: could not give back %d message(s) (%s); their lease will",
                               self.name, len(batch.claim), exc)
        self._untrack(batch)
