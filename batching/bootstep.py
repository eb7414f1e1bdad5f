"""Worker integration: a bootstep that runs one ``BatchConsumer`` per batched task of the app."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

from celery import Celery, bootsteps

from .consumer import BatchConsumer
from .events import task_events_enabled
from .metrics import Metrics, metrics_port

logger = logging.getLogger(__name__)

#: Seconds to wait for a consumer to finish its batch in hand at warm shutdown.
STOP_TIMEOUT_S = 30.0
#: The worker process's GIL switch interval while batching consumers run, in seconds (Python's default: 0.005).
#: A model thread waking from a GPU wait (or a sleep) would otherwise wait up to 5 ms for the GIL while the fetch
#: or keeper thread decodes or encodes; at 0.5 ms the three threads hand the GIL over promptly. Override with the
#: app setting ``batching_switch_interval`` (0 or None keeps Python's value).
SWITCH_INTERVAL_S = 0.0005


def batched_tasks(app: Celery) -> list[Any]:
    from .task import BatchedTask

    return sorted((t for t in app.tasks.values() if isinstance(t, BatchedTask)), key=lambda t: t.name)


class BatchingStep(bootsteps.StartStopStep):
    """Starts after the pool (so a forking pool never copies our threads) and stops before it."""

    label = "Batching"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.consumers: list[BatchConsumer] = []
        self.tasks = batched_tasks(worker.app)
        # The normal consumer must never take batch messages one by one (it would run run_batch per item), even
        # if a batch queue was named with -Q or in task_queues. The worker selected its queues before bootsteps.
        queues = worker.app.amqp.queues
        for task in self.tasks:
            if task.batching.queue in queues.consume_from:
                queues.deselect([task.batching.queue])

    def start(self, worker: Any) -> None:
        if self.tasks:
            interval = worker.app.conf.get("batching_switch_interval", SWITCH_INTERVAL_S)
            if interval:
                sys.setswitchinterval(float(interval))
        endpoint = metrics_port(worker.app) if self.tasks else None
        metrics = Metrics() if endpoint else None
        for task in self.tasks:
            consumer = BatchConsumer(
                task, hostname=worker.hostname, events_enabled=functools.partial(task_events_enabled, worker),
                metrics=metrics,
            )
            consumer.start()
            self.consumers.append(consumer)
            policy = task.batching.policy
            logger.info(
                "batching %s: consuming queue %r (batch_size=%d, max_delay=%gs)",
                task.name, task.batching.queue, policy.batch_size, policy.max_delay_s,
            )
        if metrics is not None and endpoint is not None:
            metrics.watch_queues((c.task.name, c.store) for c in self.consumers)
            metrics.serve(*endpoint)

    def stop(self, worker: Any) -> None:
        for consumer in self.consumers:
            consumer.request_stop()  # signal all first, so they wind down in parallel
        for consumer in self.consumers:
            consumer.stop(STOP_TIMEOUT_S)
        self.consumers.clear()

    terminate = stop


def install(app: Celery) -> None:
    """Register the bootstep on ``app`` (idempotent): ``celery -A app worker`` then needs no extra flags."""
    if BatchingStep not in app.steps["worker"]:
        app.steps["worker"].add(BatchingStep)
