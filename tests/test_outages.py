"""Redis refusing writes (maxmemory reached) and consumer threads that end anyway: nothing stuck, no restart."""

from __future__ import annotations

import importlib
import time
import uuid
from types import ModuleType

import pytest
import redis
from celery import Celery, states

from batching import BrokerOutOfMemory, batched
from batching.worker.consumer import BatchConsumer
from batching.worker.supervisor import Supervisor
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def reliable(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.reliable")


def test_a_redis_at_maxmemory_is_ridden_out_and_clients_are_told_why(reliable, start_worker, rclient) -> None:
    worker = start_worker("tests.apps.reliable", "--pool", "solo").ready()
    results = [reliable.steady.delay(x=i) for i in range(3000)]
    wait_until(lambda: results[100].ready(), 30, "progress before Redis fills up")
    rclient.config_set("maxmemory", "1")  # far below what it uses: every write is refused (noeviction)
    try:
        with pytest.raises(BrokerOutOfMemory, match="Redis is out of memory"):
            reliable.steady.delay(x=-1)
        wait_until(lambda: "Redis failing (OutOfMemoryError" in worker.output(), 30, "the consumer to notice",
                   detail=worker.output)
        time.sleep(3)  # the outage lasts: several heartbeats and claims are refused meanwhile
    finally:
        rclient.config_set("maxmemory", "0")
    assert [r.get(timeout=60) for r in results] == [10 * i for i in range(3000)]
    assert worker.proc.poll() is None
    log = worker.output()
    assert "Traceback" not in log.split("Redis failing", 1)[1].split("Redis is back", 1)[0]
    # One line per outage, not per retry (a script that happens to write nothing succeeds even at maxmemory, so an
    # outage may be seen to end and start again once or twice).
    assert 1 <= log.count("batching tests.apps.reliable.steady: Redis failing") <= 3, log[-6000:]


def double(x):
    return [v * 2 for v in x]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_consumer_whose_thread_died_is_replaced_and_its_claims_come_back(redis_url: str, monkeypatch) -> None:
    app = Celery("supervised", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
    task = batched(app, double, name=f"supervised.double.{uuid.uuid4().hex[:6]}", lease_s=1.0)
    first = BatchConsumer.for_task(task)
    crashed: list[str] = []

    def fetch_once_then_die() -> None:
        batch = first.collect()
        if batch is not None:  # claimed, never run: only the lease can bring it back
            crashed.append(batch.claim.claim_id)
            raise SystemExit("a bug that escapes every handler")

    monkeypatch.setattr(first, "_fetch_one", fetch_once_then_die)
    held = task.delay(x=20)
    first.start()
    wait_until(lambda: crashed, 10, "the fetch thread to claim and die")
    consumers = [first]
    supervisor = Supervisor(consumers, lambda old: BatchConsumer.for_task(task), interval_s=0.05)
    supervisor.start()
    try:
        wait_until(lambda: supervisor.restarts == 1, 10, "the supervisor to replace the consumer")
        assert consumers[0] is not first
        assert held.get(timeout=15) == 40  # recovered through the lease by the new consumer
        assert task.delay(x=21).get(timeout=10) == 42
        wait_until(lambda: not any(t.is_alive() for t in first._threads), 10, "the old consumer's threads to end")
        assert held.state == states.SUCCESS
    finally:
        supervisor.stop()
        for consumer in consumers:
            consumer.stop(5)
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(consumers[0].store.keys.claims) == 0  # type: ignore[union-attr]
