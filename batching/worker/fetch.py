"""The fetch thread of a batching consumer: claim messages, sort them, form the next batch, hand it to the model.

It claims the oldest messages (``store``) and sorts them (``triage``) until the flush policy says the batch should
run; while the model is still busy with the previous batch, it keeps topping this one up in the model's one-place
slot, so batches fill by themselves under load. It holds at most one batch ahead, so other consumers still get
work. A mixin of ``BatchConsumer``, whose state (store, slot, stop event, claims in hand) it shares.

A task with ``cost=`` has its batches packed (``packing``): what does not fit the batch about to run moves, in one
script call, into a second claim, the *carry*, which the next batch starts from — still claimed, so nothing is
lost and nothing is decoded twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.worker import state as worker_state

from ..policy import COST, COUNT, SHUTDOWN
from ..store.outage import REDIS_ERRORS, Outage, Stopped, with_retries
from ..store.queue import QueueStore
from . import control
from .batch import Batch
from .packing import BUCKET_WINDOW, Pick, bucketed, in_order
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
    #: Requests claimed but left out of the batch in hand by its cost budget or bucket: the next batch's start.
    _carry: Batch | None = None

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
            # The carry first: each release puts its messages at the front of the queue, and the slot's batch holds
            # the older requests, so they end up in front, served first again.
            if self._carry is not None:
                self._release(self._carry)
                self._carry = None
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
        batch, self._carry = self._carry, None
        if batch is None:
            batch = Batch(store.new_claim())
            self._track(batch)
        try:
            formed = self._collect_into(batch, idle_timeout_s)
            if formed is not None and self.settings.cost is not None:
                self._pack(formed, bucket=self.settings.cost.bucket)
            return formed
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
        # A batch started from a carry is as old as its oldest request.
        oldest = batch.items[0].planned.seen_at if batch.items and batch.items[0].planned else None
        idle_until = time.monotonic() + idle_timeout_s
        while True:
            cost = self.settings.cost  # settings are read on every round: ``batching_set`` may swap them
            window = self.settings.policy.batch_size * (BUCKET_WINDOW if cost and cost.bucket else 1)
            if self._top_up(batch, window) and oldest is None:
                oldest = time.monotonic()
            now = time.monotonic()
            policy = self.settings.policy  # read on every round: ``batching_set`` may swap it meanwhile
            if self.settings.cost is None:
                wait = policy.wait_s(now, oldest, len(batch.claim))
            elif batch.items and self._packed_full(batch):
                wait = None
            else:  # not full by count nor by budget: wait for more, up to max_delay after the oldest request
                wait = policy.wait_s(now, oldest, min(len(batch.claim), policy.batch_size - 1))
            if wait is None:
                # ``_pack`` says COST where the budget, not the count, ends the batch.
                batch.flush_reason = batch.flush_reason or policy.reason(len(batch.claim))
                return batch
            if batch.claim and self._stopping.is_set():
                batch.flush_reason = SHUTDOWN
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

    def _top_up(self, batch: Batch, window: int = 0) -> int:
        missing = (window or self.settings.policy.batch_size) - len(batch.claim)
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
            if len(claim) >= self.settings.policy.batch_size:
                batch.flush_reason = COUNT  # also when a top-up in the model's slot filled it
            running = len(batch.items)
            # Abandoned ids are looked up (one ZMSCORE) only while some caller of this queue gave up lately.
            store = self._require_store()
            lookup = store.abandoned_among if claim.abandonments else None
            triage(batch, claim.raws[before:], self.rules, worker_state.revoked, store.now(), lookup,
                   seen_at=time.monotonic())
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
                    if batch.flush_reason == SHUTDOWN:
                        # Cut short by the stop: it runs once the model is free (after the batch it runs now, if
                        # any), as a last flush, rather than going back to the queue half-formed.
                        self._slot_changed.wait(TOPUP_MAX_S)
                        continue
                    return  # a batch waiting behind a running one: the fetch loop gives it back
                # Topping up holds the lock for one claim round trip: the model thread may wait that long.
                try:
                    if self.settings.cost is None:
                        taken = self._top_up(batch)
                    elif self._carry is None:  # not yet full: what joins it must fit, the rest waits in a carry
                        if taken := self._top_up(batch):
                            self._pack(batch, bucket=False)
                    else:
                        taken = 0
                except BaseException:
                    self._slot = None  # never run a batch whose claim may hold messages we did not see
                    self._abandon_claim(batch)
                    raise
                poll = TOPUP_MIN_S if taken else min(poll * 2, TOPUP_MAX_S)
                self._slot_changed.wait(poll)

    def _pick(self, batch: Batch, bucket: bool) -> Pick:
        """Which of the batch's requests run now, by the task's cost budget (and bucket)."""
        cost = self.settings.cost
        assert cost is not None
        planned = [item.planned for item in batch.items]
        assert all(p is not None for p in planned), "a task with cost= plans every request it runs (triage)"
        costs = [p.cost for p in planned if p is not None]
        policy = self.settings.policy
        if bucket:
            seen = [p.seen_at for p in planned if p is not None]
            return bucketed(costs, seen, time.monotonic(), cost, policy.batch_size, policy.max_delay_s)
        return in_order(costs, cost, policy.batch_size)

    def _packed_full(self, batch: Batch) -> bool:
        """Whether the forming batch of a task with ``cost=`` is full: by count, or by its budget."""
        return self._pick(batch, bucket=bool(self.settings.cost and self.settings.cost.bucket)).full

    def _pack(self, batch: Batch, *, bucket: bool) -> None:
        """Keep in ``batch`` what runs now; move the rest into a new carry, claimed for the next batch."""
        if not batch.items:
            return
        pick = self._pick(batch, bucket)
        if pick.by_cost and len(pick.chosen) < self.settings.policy.batch_size:
            batch.flush_reason = COST
        items = batch.items
        if len(pick.chosen) == len(items):
            return
        assert self._carry is None, "one carry at a time: the next batch starts from it"
        chosen = set(pick.chosen)
        leaving = [item for i, item in enumerate(items) if i not in chosen]
        store = self._require_store()
        carry = Batch(store.new_claim(), claimed_at=batch.claimed_at)
        # Messages redelivered after a crash stay on their own, as claim.lua hands them out.
        carry.claim.redelivered = batch.claim.redelivered
        self._track(carry)
        try:
            moved = store.carry(batch.claim, carry.claim, [item.planned.raw for item in leaving if item.planned])
        except BaseException:
            self._untrack(carry)  # the move may have happened: the carry's lease brings its messages back
            raise
        batch.items[:] = [items[i] for i in pick.chosen]
        ids = {item.request.id for item in leaving}
        if batch.tracked:
            carry.tracked.extend(t for t in batch.tracked if t.request.id in ids)
            batch.tracked[:] = [t for t in batch.tracked if t.request.id not in ids]
        carry.items.extend(leaving)
        if moved:
            self._carry = carry
        else:
            # Our claim was taken over (its lease ran out): those requests are back in the queue, not ours.
            self._untrack(carry)

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
