"""Prometheus metrics of the batching consumers, on an opt-in HTTP endpoint of the worker.

Turn it on with the app setting ``batching_metrics_port`` (or the ``BATCHING_METRICS_PORT`` environment variable;
``batching_metrics_addr`` / ``BATCHING_METRICS_ADDR`` picks the address, default 0.0.0.0; see ``tunables``).
Everything is labelled by task; the batch counter and batch-size histogram also by ``reason``, why each batch was
flushed (``policy.FLUSH_REASONS``). Counters and histograms are updated once per batch by the consumers; queue
depth, the backlog and oldest-request age an autoscaler reads, in-flight claims and dead letters are read from
Redis when scraped (one snapshot per task, see ``store.snapshot``), so they describe the queue as every worker
sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from celery import states
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import RequestAbandoned
from ..store.snapshot import status_of
from .batch import Outcome

logger = logging.getLogger(__name__)

#: Batch sizes are counted in powers of two up to 1024.
SIZE_BUCKETS = tuple(float(2**i) for i in range(11))
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OUTCOME = {states.SUCCESS: "succeeded", states.FAILURE: "failed", states.RETRY: "retried", states.REVOKED: "revoked"}


class Metrics:
    """The consumers' instruments, in a registry of their own (so tests and apps can hold several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batches = Counter("batching_batches", "Batches run by run_batch, by why they were flushed",
                               ["task", "reason"], registry=r)
        self.batch_size = Histogram(
            "batching_batch_size", "Requests per batch, by why it was flushed", ["task", "reason"],
            buckets=SIZE_BUCKETS, registry=r,
        )
        self.run_seconds = Histogram(
            "batching_run_batch_seconds", "Duration of run_batch calls", ["task"], buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "batching_queue_wait_seconds", "From a client sending a request to a consumer claiming it", ["task"],
            buckets=SECONDS_BUCKETS, registry=r,
        )
        self.items = Counter("batching_items", "Requests settled, by outcome", ["task", "outcome"], registry=r)
        self.dead_lettered = Counter("batching_dead_lettered", "Messages dead-lettered", ["task"], registry=r)
        self.data_lost = Counter(
            "batching_redis_data_lost", "Times the consumers found that Redis had lost its data (a restart without "
            "persistence, a flush)", ["task"], registry=r,
        )
        self.late_outcomes = Counter(
            "batching_late_outcomes", "Outcomes dropped because their claim had been taken over (lease ran out)",
            ["task"], registry=r,
        )

    def batch_ran(self, task: str, size: int, seconds: float, reason: str) -> None:
        self.batches.labels(task, reason).inc()
        self.batch_size.labels(task, reason).observe(size)
        self.run_seconds.labels(task).observe(seconds)

    def settled(self, task: str, outcomes: Sequence[Outcome], claimed_at: float, dead: int) -> None:
        self.record_settled(task, *tally(outcomes, claimed_at), dead)

    def record_settled(self, task: str, counts: dict[str, int], waits: list[float], dead: int) -> None:
        """A settled batch, already tallied (here, or by an instance process that reports to this one)."""
        wait = self.queue_wait.labels(task)
        for seconds in waits:
            wait.observe(seconds)
        for label, n in counts.items():
            self.items.labels(task, label).inc(n)
        if dead:
            self.dead_lettered.labels(task).inc(dead)

    def watch_queues(self, stores: Iterable[tuple[str, Any]]) -> None:
        """Report the live state of these (task name, QueueStore) queues on every scrape."""
        self.registry.register(_QueueCollector(list(stores)))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        logger.info("batching: Prometheus metrics on http://%s:%d/metrics", addr, port)


def tally(outcomes: Sequence[Outcome], claimed_at: float) -> tuple[dict[str, int], list[float]]:
    """Settled items by outcome label, and each one's queue wait in seconds (when it is known)."""
    counts: dict[str, int] = {}
    waits = []
    for o in outcomes:
        label = "abandoned" if isinstance(o.value, RequestAbandoned) else _OUTCOME.get(o.state, o.state.lower())
        counts[label] = counts.get(label, 0) + 1
        sent_at = getattr(o.request, "sent_at", None)
        if sent_at is not None and claimed_at:
            waits.append(max(0.0, claimed_at - sent_at))
    return counts, waits


class _QueueCollector(Collector):
    def __init__(self, stores: list[tuple[str, Any]]) -> None:
        self.stores = stores

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "depth": GaugeMetricFamily("batching_queue_depth", "Messages waiting in the queue", labels=["task"]),
            "age": GaugeMetricFamily(
                "batching_oldest_message_age_seconds", "Age of the next message to be served", labels=["task"]
            ),
            "backlog": GaugeMetricFamily(
                "batching_backlog", "Requests waiting in the queue plus in flight (claimed, not finished): what to "
                "scale workers on; messages parked until their ETA are not counted", labels=["task"],
            ),
            "request_age": GaugeMetricFamily(
                "batching_oldest_request_age_seconds", "Age of the oldest request waiting or in flight (0: none)",
                labels=["task"],
            ),
            "in_flight": GaugeMetricFamily(
                "batching_in_flight", "Messages claimed by a consumer and not finished", labels=["task"]
            ),
            "claims": GaugeMetricFamily("batching_claims", "Open claims (batches in hand)", labels=["task"]),
            "delayed": GaugeMetricFamily("batching_delayed", "Messages parked until their ETA", labels=["task"]),
            "dead": GaugeMetricFamily("batching_dead_letters", "Messages in the dead-letter list", labels=["task"]),
            "consumers": GaugeMetricFamily("batching_consumers", "Live consumers of the queue", labels=["task"]),
            "heartbeat": GaugeMetricFamily(
                "batching_consumer_heartbeat_age_seconds", "Seconds since a consumer's last heartbeat (every lease/4 "
                "while healthy)", labels=["task", "consumer"],
            ),
        }
        for name, store in self.stores:
            try:
                s = status_of(store, name)
            except Exception as exc:  # an unreachable Redis must not break the whole scrape
                logger.debug("batching: no queue metrics for %s: %s", name, exc)
                continue
            families["depth"].add_metric([name], s.depth)
            families["age"].add_metric([name], s.oldest_age_s or 0.0)
            families["backlog"].add_metric([name], s.backlog)
            families["request_age"].add_metric([name], s.oldest_request_age_s or 0.0)
            families["in_flight"].add_metric([name], s.in_flight)
            families["claims"].add_metric([name], s.claims)
            families["delayed"].add_metric([name], s.delayed)
            families["dead"].add_metric([name], s.dead)
            families["consumers"].add_metric([name], s.consumers)
            for consumer, age in s.heartbeat_ages_s.items():
                families["heartbeat"].add_metric([name, consumer], age)
        yield from families.values()
