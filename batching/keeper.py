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
import time
from collections.abc import Callable
from typing import Any

from . import canvas
from .deadletters import failures_for
from .events import BatchEvents
from .metrics import Metrics
from .outage import REDIS_ERRORS, RETRY_MIN_S, Outage, next_backoff
from .results import ResultWriter
from .store import QueueStore
from .triage import Batch

logger = logging.getLogger(__name__)


class Keeper:
    """Settles batches and keeps leases for one consumer; used from that consumer's keeper thread only."""

    def __init__(
        self, task: Any, store: QueueStore, outage: Outage, *, hostname: str, events_enabled: Callable[[], bool],
        accept: Any, metrics: Metrics | None = None,
    ) -> None:
        self.task = task
        self.store = store
        self.outage = outage
        self.accept = accept
        self.writer = ResultWriter(task.app.backend)
        self.events = BatchEvents(task.app, hostname, events_enabled)
        self.metrics = metrics

    def settle(self, batch: Batch) -> None:
        """Follow up, store, finish: retried through Redis outages until done."""
        app, task = self.task.app, self.task
        outcomes = batch.settled
        retries = canvas.plan_retries(task, outcomes)
        canvas.send_callbacks(app, outcomes)
        batch.finish.ran = len(batch.runnable)
        backoff = RETRY_MIN_S
        while True:
            try:
                self.writer.write(outcomes)
                break
            except REDIS_ERRORS as exc:
                self.outage.failed(exc)
                time.sleep(backoff)
                backoff = next_backoff(backoff)
        canvas.after_store(app, outcomes)
        canvas.send_retries(task, retries)
        self.events.send_batch(
            outcomes, received=batch.claimed_at or time.time(), started=batch.started_at, finished=time.time()
        )
        while True:
            try:
                if batch.claim and not self.store.finish(batch.claim, batch.finish):
                    logger.warning("batching %s: a claim of %d message(s) outlived its lease and was re-queued; "
                                   "they may run again", task.name, len(batch.claim))
                self.outage.ok()
                break
            except REDIS_ERRORS as exc:
                self.outage.failed(exc)
                time.sleep(backoff)
                backoff = next_backoff(backoff)
        for reason, _raw in batch.finish.dead:
            logger.warning("batching %s: dead-lettered a message: %s", task.name, reason)
        if self.metrics is not None:
            self.metrics.settled(task.name, outcomes, batch.claimed_at, len(batch.finish.dead))

    def maintain(self, consumer_id: str, active: list[str]) -> None:
        """Keep our leases alive and recover the claims of consumers that died."""
        try:
            self.store.heartbeat(consumer_id, active)
            requeued, dead = self.store.recover()
        except REDIS_ERRORS as exc:
            self.outage.failed(exc)
            return
        if requeued or dead:
            logger.warning("batching %s: re-queued %d message(s) from expired claims, dead-lettered %d",
                           self.task.name, requeued, len(dead))
        if dead:
            if self.metrics is not None:
                self.metrics.dead_lettered.labels(self.task.name).inc(len(dead))
            with contextlib.suppress(*REDIS_ERRORS):
                self.writer.write(failures_for(dead, self.accept, self.store.max_deliveries))

    def close(self, consumer_id: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self.store.leave(consumer_id)
        self.events.close()
