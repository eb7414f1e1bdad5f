"""The keeper: what happens to a batch after the model — follow-ups, results, events, finishing the claim — and
the housekeeping between batches: heartbeats for our leases, recovery of dead consumers' claims.

Order matters and is Celery's: retries are planned and callbacks sent first (their ids become the meta's
``children``), then every result is stored in one round trip, then chord parts and errbacks run through the
backend, retries are re-sent, events go out in one publish, and only then is the claim finished. A crash
anywhere before the last step leaves the claim to be recovered: work may repeat, nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from ..codec import task_id_of
from ..errors import MessageError, NotReplicated
from ..store.durability import record_loss
from ..store.outage import REDIS_ERRORS, Outage, with_retries
from ..store.queue import NEVER_FINISHED, QueueStore
from . import canvas, control
from .batch import Batch, Outcome
from .events import BatchEvents
from .results import ResultWriter

if TYPE_CHECKING:
    from ..settings import BatchSettings
    from .coalescing import Coalescer
    from .metrics import Metrics
    from .signals import TaskSignals

logger = logging.getLogger(__name__)


class Keeper:
    """Settles batches and keeps leases for one consumer; used from that consumer's keeper thread only."""

    def __init__(
        self, app: Any, settings: BatchSettings, store: QueueStore, outage: Outage, *, events: BatchEvents,
        accept: Collection[str], stop: threading.Event, metrics: Metrics | None = None,
        socket_timeout_s: float | None = None,
        signals: TaskSignals | None = None, coalescer: Coalescer | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self.outage = outage
        self.accept = accept
        self.stop = stop
        self.writer = ResultWriter(app.backend, socket_timeout_s=socket_timeout_s, replicas=store.replicas)
        #: Results go to the broker's Redis database: the write itself can check the claim is still ours.
        self.fence_in_write = self.writer.fences_on(store.client)
        self.events = events
        self.metrics = metrics
        self.signals = signals
        self.coalescer = coalescer

    def settle(self, batch: Batch) -> None:
        """Follow up, store, finish: retried through Redis outages until done, or until the consumer stops
        (``Stopped``: the claim is then left to the lease)."""
        app, name = self.app, self.settings.name
        answers = self.coalescer.answers(batch) if self.coalescer is not None and batch.coalesced is not None \
            else None
        control.seal(batch)  # items terminated while the batch ran are dropped: REVOKED is already stored
        outcomes = batch.outcomes()
        # Fencing: a consumer whose lease ran out (partitioned, paused) may find its batch re-queued and run
        # elsewhere. Then none of its follow-ups or results may land: the other run's stand. Checked before the
        # follow-ups, and again atomically with the results when they share the broker's Redis. When nothing is
        # sent before the results (no callbacks or chains: the common case), the first check guards nothing the
        # second does not, and its round trip per batch is saved.
        claim = batch.claim
        lost_with_data = False
        followers: list[Outcome] = []
        if answers is not None and self.coalescer is not None:
            # Closing the computation is the claim owner's alone (the script checks it): a consumer that lost its
            # claim gets no followers to answer.
            coalescer = self.coalescer
            followers = with_retries(lambda: coalescer.followers(batch, answers), self.outage, self.stop)
            outcomes = outcomes + followers
        checked_first = bool(claim) and (not self.fence_in_write or canvas.sends_before_store(outcomes))
        if checked_first and not with_retries(lambda: self.store.owns(claim), self.outage, self.stop, writes=False):
            lost_with_data = self._lost_with_data(batch)
            if not lost_with_data:
                self._fenced_off(batch, outcomes)
                return
        retries = canvas.plan_retries(self.settings.retry, outcomes)
        canvas.send_callbacks(app, outcomes)
        batch.finish.ran, batch.finish.flush_reason = len(batch.items), batch.flush_reason
        fence = (self.store.keys.claims, claim.claim_id) if claim and self.fence_in_write and not lost_with_data \
            else None
        if not with_retries(lambda: self.writer.write(outcomes, fence), self.outage, self.stop):
            if checked_first or fence is None or not self._lost_with_data(batch):
                self._fenced_off(batch, outcomes)
                return
            lost_with_data = True
            with_retries(lambda: self.writer.write(outcomes, None), self.outage, self.stop)
        canvas.after_store(app, outcomes)
        canvas.send_retries(app, name, retries)
        if self.signals is not None:
            self.signals.settled(batch, retries, followers)
        self.events.send_batch(
            outcomes, received=batch.claimed_at or time.time(), started=batch.started_at, finished=time.time()
        )
        if claim and not lost_with_data:
            self._finish(batch)
        for reason, _raw in batch.finish.dead:
            logger.warning("batching %s: dead-lettered a message: %s", name, reason)
        if self.metrics is not None:
            self.metrics.settled(name, outcomes, batch.claimed_at, len(batch.finish.dead))

    def _finish(self, batch: Batch) -> None:
        claim, unconfirmed = batch.claim, []

        def finish() -> bool:
            try:
                return self.store.finish(claim, batch.finish)
            except NotReplicated:
                unconfirmed.append(True)  # it may have happened on the master all the same
                raise

        if with_retries(finish, self.outage, self.stop):
            return
        if unconfirmed:
            logger.warning("batching %s: finishing a claim of %d message(s) was not confirmed by the replicas in "
                           "time; on retrying, the claim was gone: it was finished before a failover, or its lease "
                           "ran out meanwhile and its messages may run again", self.settings.name, len(claim))
        else:
            logger.warning("batching %s: a claim of %d message(s) outlived its lease and was taken over while its "
                           "results were stored; they may run again", self.settings.name, len(claim))

    def _lost_with_data(self, batch: Batch) -> bool:
        """Whether a claim that is no longer registered vanished with Redis's data (logged) rather than passing
        to another consumer: then nobody else holds its messages, and this run's results are all there will be."""
        lost = with_retries(lambda: self.store.outlived_data(batch.claim), self.outage, self.stop, writes=False)
        if lost:
            logger.error("batching %s: Redis lost its data while a batch of %d ran; storing its results anyway",
                         self.settings.name, len(batch.claim))
        return bool(lost)

    def _fenced_off(self, batch: Batch, outcomes: list[Outcome]) -> None:
        logger.warning("batching %s: the claim of %d message(s) was taken over after this consumer's lease ran out; "
                       "dropped the %d outcome(s) of this late run (the other run's stand)",
                       self.settings.name, len(batch.claim), len(outcomes))
        if self.metrics is not None:
            self.metrics.late_outcomes.labels(self.settings.name).inc(len(outcomes))

    def maintain(self, consumer_id: str, active: list[str], tuning: str = "{}") -> None:
        """Keep our leases alive, say which batching values we use (JSON) and recover the claims of consumers that
        died."""
        try:
            if self.store.heartbeat(consumer_id, active, tuning):
                self._data_lost()
            requeued, dead = self.store.recover()
        except REDIS_ERRORS as exc:
            self.outage.failed(exc)
            return
        if requeued or dead:
            logger.warning("batching %s: re-queued %d message(s) from expired claims, dead-lettered %d",
                           self.settings.name, requeued, len(dead))
        if dead:
            if self.metrics is not None:
                self.metrics.dead_lettered.labels(self.settings.name).inc(len(dead))
            with contextlib.suppress(*REDIS_ERRORS):
                self.writer.write(never_finished(dead, self.accept, self.store.max_deliveries))

    def _data_lost(self) -> None:
        entry = record_loss(self.store)
        logger.error(
            "batching %s: REDIS LOST ITS DATA (now run_id %s): every message queued or claimed for this task before "
            "then is gone and cannot be recovered; clients waiting on them will time out. Run the broker Redis with "
            "appendonly yes (and a replica) to survive restarts.", self.settings.name, entry["run_id"],
        )
        if self.metrics is not None:
            self.metrics.data_lost.labels(self.settings.name).inc()

    def close(self, consumer_id: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self.store.leave(consumer_id)
        self.events.close()
        if self.signals is not None:
            self.signals.close()


def never_finished(raws: Iterable[bytes], accept: Collection[str], max_deliveries: int) -> list[Outcome]:
    """FAILURE outcomes for messages dead-lettered after too many unfinished deliveries (when their id is known)."""
    error = f"dead-lettered after {max_deliveries} deliveries that never finished: {NEVER_FINISHED}"
    return [Outcome.failure(task_id, MessageError(error)) for raw in raws if (task_id := task_id_of(raw, accept))]
