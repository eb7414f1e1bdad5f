"""Running one batch through the model, on the consumer's model thread, within the task's time limits.

The hard time limit and the model race to settle a batch: whichever comes first hands the outcomes on, under a
lock, and the other's are dropped — so a batch is never settled twice, and a call abandoned at its hard limit is
failed on time even though its thread cannot be killed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from .limits import TimeLimits, Watchdog
from .merge import execute
from .metrics import Metrics
from .results import Outcome
from .triage import Batch

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    batch: Batch
    settled: bool = False


class ModelRunner:
    """Runs batches of one batched task and passes each, with an outcome per request, to ``deliver``."""

    def __init__(self, task: Any, deliver: Callable[[Batch], None], metrics: Metrics | None = None) -> None:
        self.task = task
        self.config = task.batching
        self.deliver = deliver
        self.metrics = metrics
        self._lock = threading.Lock()

    def run(self, batch: Batch) -> None:
        running = _Running(batch)
        batch.started_at = time.time()
        limits = TimeLimits.for_batch(self.task, [c.timelimit for c in batch.contexts])
        results: list[Any] | None = None
        try:
            with Watchdog(limits, lambda: self._abandon(running, limits)):
                results = self._call_model(batch)
        except SoftTimeLimitExceeded as exc:  # the soft limit fired as the call returned
            if results is None:
                results = [exc] * len(batch.runnable)
        if self.metrics is not None:
            self.metrics.batch_ran(self.task.name, len(batch.runnable), time.time() - batch.started_at)
        with self._lock:
            if running.settled:
                logger.warning("batching %s: an abandoned run_batch call returned after its hard time limit; "
                               "its results were discarded", self.task.name)
                return
            running.settled = True
        for request, context, result in zip(batch.runnable, batch.contexts, results, strict=True):
            batch.settled.append(Outcome.of(request.id, result, context))
        self.deliver(batch)

    def _call_model(self, batch: Batch) -> list[Any]:
        try:
            run_batch = self.config.run_batch()
        except Exception as exc:  # a model that cannot load fails this batch; the next batch tries again
            logger.exception("batching %s: building the model failed", self.task.name)
            return [exc] * len(batch.runnable)
        return execute(
            self.config.spec, run_batch, [(r.args, r.kwargs) for r in batch.runnable],
            isolate=self.config.isolate_errors,
        )

    def _abandon(self, running: _Running, limits: TimeLimits) -> None:
        """Hard time limit (timer thread): fail the batch now; the model's late answer is dropped."""
        with self._lock:
            if running.settled:
                return
            running.settled = True
        batch = running.batch
        logger.error("batching %s: run_batch exceeded its hard time limit of %ss on a batch of %d; failing it, "
                     "no further batch starts until the call returns", self.task.name, limits.hard, len(batch.runnable))
        for request, context in zip(batch.runnable, batch.contexts, strict=True):
            error = TimeLimitExceeded(f"run_batch exceeded the hard time limit ({limits.hard}s)")
            batch.settled.append(Outcome.failure(request.id, error, context))
        self.deliver(batch)
