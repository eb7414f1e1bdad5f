"""Running one batch through the model, on the consumer's model thread, within the task's time limits.

The hard time limit and the model race to settle a batch: whichever comes first gives every item its outcome and
hands the batch on, under a lock, and the other's outcomes are dropped — so a batch is never settled twice, and a
call abandoned at its hard limit is failed on time even though its thread cannot be killed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from ..coalesce import distinct
from ..merge import execute
from ..model import ModelHandle
from .batch import Batch, Outcome
from .limits import TimeLimits, Watchdog

if TYPE_CHECKING:
    from ..settings import BatchSettings
    from .metrics import Metrics
    from .results import Started
    from .signals import TaskSignals

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs batches of one batched task and passes each, with an outcome per item, to ``deliver``."""

    def __init__(
        self, settings: BatchSettings, model: ModelHandle, deliver: Callable[[Batch], None],
        metrics: Metrics | None = None, *, signals: TaskSignals | None = None, started: Started | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.deliver = deliver
        self.metrics = metrics
        self.signals = signals
        self.started = started

    def run(self, batch: Batch) -> None:
        batch.started_at = time.time()
        if self.signals is not None:
            self.signals.prerun(batch)
        if self.started is not None:
            self.started.mark(batch)
        limits = TimeLimits.for_batch(self.settings, [item.request.timelimit for item in batch.items])
        race = _Race()
        results: list[Any] | None = None
        try:
            with Watchdog(limits, lambda: self._abandon(batch, limits, race)):
                results = self._call_model(batch)
        except SoftTimeLimitExceeded as exc:  # the soft limit fired as the call returned
            if results is None:
                results = [exc] * len(batch.items)
        if self.signals is not None:
            self.signals.ran(batch)
        seconds = time.time() - batch.started_at
        if self.metrics is not None:
            self.metrics.batch_ran(self.settings.name, len(batch.items), seconds, batch.flush_reason)
        logger.debug("batching %s: ran a batch of %d in %.1f ms (flush: %s)", self.settings.name, len(batch.items),
                     seconds * 1000, batch.flush_reason)
        if not race.win():
            logger.warning("batching %s: an abandoned run_batch call returned after its hard time limit; "
                           "its results were discarded", self.settings.name)
            return
        for item, result in zip(batch.items, results, strict=True):
            item.outcome = Outcome.of(item.request.id, result, item.request)
        self.deliver(batch)

    def _call_model(self, batch: Batch) -> list[Any]:
        try:
            run_batch = self.model.run_batch()
        except Exception as exc:  # a model that cannot load fails this batch; the next batch tries again
            logger.exception("batching %s: building the model failed", self.settings.name)
            return [exc] * len(batch.items)
        requests = [(item.request.args, item.request.kwargs) for item in batch.items]
        coalesced = batch.coalesced
        if coalesced is None:
            return execute(self.settings.spec, run_batch, requests, isolate=self.settings.isolate_errors)
        # coalesce=True: the model sees each distinct input once; duplicates share its result or error.
        run, source = distinct([coalesced.keys.get(item.request.id) for item in batch.items])
        results = execute(self.settings.spec, run_batch, [requests[i] for i in run],
                          isolate=self.settings.isolate_errors)
        return [results[slot] for slot in source]

    def _abandon(self, batch: Batch, limits: TimeLimits, race: _Race) -> None:
        """Hard time limit (timer thread): fail the batch now; the model's late answer is dropped."""
        if not race.win():
            return
        logger.error("batching %s: run_batch exceeded its hard time limit of %ss on a batch of %d; failing it, "
                     "no further batch starts until the call returns", self.settings.name, limits.hard,
                     len(batch.items))
        for item in batch.items:
            error = TimeLimitExceeded(f"run_batch exceeded the hard time limit ({limits.hard}s)")
            item.outcome = Outcome.failure(item.request.id, error, item.request)
        self.deliver(batch)


class _Race:
    """Who settles one batch: the model's answer or the hard time limit, whichever comes first."""

    __slots__ = ("_lock", "_won")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._won = False

    def win(self) -> bool:
        """True for the first caller only."""
        with self._lock:
            if self._won:
                return False
            self._won = True
            return True
