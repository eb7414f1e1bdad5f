"""The worker's opt-in Prometheus endpoint, scraped over HTTP while a real worker serves batches."""

from __future__ import annotations

import importlib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batching.redis_server import free_port
from tests.waiting import poll_until

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def summed(m: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (over every other label, e.g. every flush reason)."""
    return sum(v for (n, got), v in m.items() if n == name and set(labels.items()) <= set(got))


def test_metrics_endpoint_counts_batches_items_and_queue_state(redis_url, start_worker, rclient):
    shop = importlib.import_module("tests.apps.shop")
    port = free_port()
    env = {"BATCHING_METRICS_PORT": str(port), "BATCHING_METRICS_ADDR": "127.0.0.1"}
    worker = start_worker("tests.apps.shop", "--pool", "solo", env=env).ready()
    assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.output()

    ok = [shop.picky.delay(x=i) for i in range(20)]
    bad = [shop.picky.delay(x=-i - 1) for i in range(3)]
    assert [r.get(timeout=30) for r in ok] == [2 * i for i in range(20)]
    for r in bad:
        with pytest.raises(ValueError):
            r.get(timeout=30)
    later = shop.picky.apply_async(kwargs={"x": 1}, countdown=60)  # parked: shows up as delayed

    task = (("task", shop.picky.name),)

    def settled() -> dict[tuple[str, tuple], float] | None:
        m = scrape(port)
        succeeded = m.get(("batching_items_total", (("outcome", "succeeded"), *task)), 0) >= 20
        return m if succeeded and m.get(("batching_delayed", task)) == 1 else None

    m = poll_until(settled, 10, "the metrics to count every item and the delayed task", interval=0.05)
    assert m[("batching_items_total", (("outcome", "succeeded"), *task))] == 20
    assert m[("batching_items_total", (("outcome", "failed"), *task))] == 3
    batches = summed(m, "batching_batches_total", task=shop.picky.name)
    assert 1 <= batches <= 23
    assert summed(m, "batching_batch_size_count", task=shop.picky.name) == batches
    assert summed(m, "batching_batch_size_sum", task=shop.picky.name) == 23
    # picky waits up to max_delay=0.02 s for a batch of 8: every batch is full or its wait was over
    reasons = {dict(labels)["reason"] for (n, labels) in m if n == "batching_batches_total"}
    assert reasons <= {"count", "max_delay"}, reasons
    assert m[("batching_run_batch_seconds_count", task)] == batches
    assert m[("batching_queue_wait_seconds_count", task)] == 23
    assert m[("batching_delayed", task)] == 1
    assert m[("batching_queue_depth", task)] == 0
    assert m[("batching_backlog", task)] == 0  # the delayed task is not due: nothing to scale for
    assert m[("batching_oldest_request_age_seconds", task)] == 0
    assert m[("batching_consumers", task)] == 1
    assert m[("batching_dead_letters", task)] == 0
    later.revoke()
