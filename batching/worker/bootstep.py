"""Worker integration: a bootstep that runs one ``BatchConsumer`` per batched task of the app.

``batched()`` registers it by its dotted name, so only ``celery worker`` ever imports this module (and with it
the consumer, the keeper, the time limits and prometheus-client).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from celery import bootsteps

from .. import tuning
from ..errors import ConfigurationError
from ..settings import BatchSettings
from ..store.durability import persistence_warning
from ..store.queue import QueueStore
from ..task import batched_tasks
from . import control
from .consumer import BatchConsumer
from .events import task_events_enabled
from .instances import InstancePool
from .supervisor import Supervisor
from .tunables import STOP_TIMEOUT_S, WorkerSettings

logger = logging.getLogger(__name__)


class BatchingStep(bootsteps.StartStopStep):
    """Starts after the pool (so a forking pool never copies our threads) and stops before it.

    The consumers connect here (a broker that cannot work fails the worker at once) but claim nothing until the
    worker is ready: only then does it take remote-control commands and has it synced the revoked ids of its peers
    (mingle), so a revoke sent to the workers is never missed by a batch claimed early. The hook is the worker's
    ``ready_callback``, which its consumer calls once, after the first start of the consumer blueprint (which
    restarts on every broker reconnect; ours must not), just before ``worker_ready`` is sent — embedded workers
    (``celery.contrib.testing``) call it too, without sending the signal.
    """

    label = "Batching"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.consumers: list[BatchConsumer] = []
        self.supervisor: Supervisor | None = None
        #: The instance processes of the tasks served outside this process (``instances=N``, recycling).
        self.pool: InstancePool | None = None
        self._stores: list[tuple[str, QueueStore, Any]] = []
        self.tasks = batched_tasks(worker.app)
        if self.tasks:  # read by the Consumer step when it is created, after every step's __init__
            worker.ready_callback = functools.partial(self._on_worker_ready, worker.ready_callback)
            tuning.install()  # `celery control batching_set` reaches ``batching_retune``
        # Unknown batching_* settings fail the worker here, before it serves anything, naming the valid ones.
        self.settings = WorkerSettings.from_app(worker.app.conf, os.environ)
        # The normal consumer must never take batch messages one by one (it would run run_batch per item), even
        # if a batch queue was named with -Q or in task_queues. The worker selected its queues before bootsteps.
        queues = worker.app.amqp.queues
        for task in self.tasks:
            if task.batching.queue in queues.consume_from:
                queues.deselect([task.batching.queue])

    def start(self, worker: Any) -> None:
        if not self.tasks:
            return
        if self.settings.switch_interval_s:
            sys.setswitchinterval(self.settings.switch_interval_s)
        metrics = None
        if self.settings.metrics_port is not None:
            from .metrics import Metrics  # prometheus-client is imported only when the endpoint is on

            metrics = Metrics()
        options = dict(hostname=worker.hostname, events_enabled=functools.partial(task_events_enabled, worker),
                       metrics=metrics)
        by_name = {task.name: task for task in self.tasks}
        for task in self.tasks:
            if task.batching.in_processes:
                # Served by instance processes; this one only reads the queue (metrics, status) and never builds
                # the model. Opening the store fails the worker at once on a broker that cannot work.
                store, connection = QueueStore.open(worker.app, task.worker_settings())
                self._stores.append((task.name, store, connection))
                continue
            consumer = BatchConsumer.for_task(task, **options)
            consumer.connect()
            self.consumers.append(consumer)
        stores = [(c.name, c.store) for c in self.consumers] + [(name, s) for name, s, _ in self._stores]
        if metrics is not None and self.settings.metrics_port is not None:
            metrics.watch_queues(stores)
            metrics.serve(self.settings.metrics_port, self.settings.metrics_addr)
        warning = persistence_warning(stores[0][1].client) if stores and stores[0][1] else None
        if warning:
            logger.warning("batching: %s", warning)
        def replace(old: BatchConsumer) -> BatchConsumer:
            fresh = BatchConsumer.for_task(by_name[old.name], **options)
            fresh.retune(old.settings)  # keeps what batching_set changed
            return fresh

        self.supervisor = Supervisor(self.consumers, replace)
        pooled = [task for task in self.tasks if task.batching.in_processes]
        if pooled:
            self.pool = InstancePool(worker, pooled, metrics, options["events_enabled"],
                                     self.settings.switch_interval_s)
        control.serve_queues(worker.app, [t.batching.queue for t in self.tasks])

    def batching_retune(self, name: str, changes: dict[str, Any]) -> tuple[BatchSettings, BatchSettings]:
        """``batching_set`` (``tuning``): apply ``changes`` to the consumer of task ``name``, checked as ``@batched``
        checks them; returns its settings before and after. Raises ``ConfigurationError`` and changes nothing if
        the task is not served here or a value is refused."""
        consumers = [c for c in self.consumers if c.name == name]
        pooled = self.pool.settings if self.pool is not None else {}
        if not consumers and name not in pooled:
            served = ", ".join(sorted({c.name for c in self.consumers} | set(pooled))) or "none"
            raise ConfigurationError(f"{name!r} is not a batched task of this worker (it serves: {served})")
        before = consumers[0].settings if consumers else pooled[name]
        after = tuning.retuned(before, changes)
        for consumer in consumers:
            consumer.retune(after)
        if self.pool is not None and name in pooled:
            self.pool.retune(name, after, changes)  # its instance processes apply it too
        logger.info("batching %s: now %s (was %s), by %s", name, tuning.describe(after), tuning.describe(before),
                    tuning.COMMAND)
        return before, after

    def _on_worker_ready(self, ready: Any, celery_consumer: Any) -> None:
        for consumer in self.consumers:
            consumer.start()
            policy = consumer.settings.policy
            logger.info(
                "batching %s: consuming queue %r (batch_size=%d, max_delay=%gs)",
                consumer.name, consumer.settings.queue, policy.batch_size, policy.max_delay_s,
            )
        if self.supervisor is not None:
            self.supervisor.start()
        if self.pool is not None:
            self.pool.start()
            for task in self.tasks:
                if task.batching.in_processes:
                    policy = task.batching.policy
                    logger.info("batching %s: %d instance process(es) consuming queue %r (batch_size=%d, "
                                "max_delay=%gs)", task.name, task.batching.instances, task.batching.queue,
                                policy.batch_size, policy.max_delay_s)
        ready(celery_consumer)

    def stop(self, worker: Any) -> None:
        control.stop_serving(t.batching.queue for t in self.tasks)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.pool is not None:
            self.pool.request_stop()
        for consumer in self.consumers:
            consumer.request_stop()  # signal all first, so they wind down in parallel
        for consumer in self.consumers:
            consumer.stop(STOP_TIMEOUT_S)
        if self.pool is not None:
            self.pool.stop(STOP_TIMEOUT_S)
            self.pool = None
        self.consumers.clear()
        for _name, _store, connection in self._stores:
            connection.release()
        self._stores.clear()

    terminate = stop
