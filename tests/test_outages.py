"""Redis refusing writes (maxmemory reached) and consumer threads that end anyway: nothing stuck, no restart."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from types import ModuleType

import pytest
import redis
from celery import Celery, states

from batching import BrokerOutOfMemory, batched
from batching.redis_server import find_redis_server, free_port
from batching.worker.consumer import BatchConsumer
from batching.worker.supervisor import Supervisor
from tests.conftest import Worker
from tests.test_reliability import _pings
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


def test_a_redis_that_lost_its_data_is_reported_loudly_once(tmp_path, reliable) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen[bytes]:  # no persistence at all: a restart loses everything
        proc = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _pings(url), 10, "redis-server to start")
        return proc

    server = start_redis()
    worker = Worker("tests.apps.reliable", url, tmp_path / "w.log", "--pool", "solo")
    try:
        worker.ready()
        assert "the broker Redis keeps nothing on disk" in worker.output()
        queued = subprocess.run(  # a client bound to this Redis: tasks queued before the restart
            [sys.executable, "-c", "from tests.apps import reliable as r\n"
             "for i in range(200): r.steady.apply_async(kwargs={'x': i}, countdown=60)"],
            env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=False,
        )
        assert queued.returncode == 0, queued.stderr
        server.terminate()
        server.wait(10)
        server = start_redis()
        lost = "batching tests.apps.reliable.steady: REDIS LOST ITS DATA"
        wait_until(lambda: lost in worker.output(), 30, "the worker to notice the loss", detail=worker.output)
        status = subprocess.run(
            [sys.executable, "-m", "batching.cli", "status", "-A", "tests.apps.reliable", "--json"],
            env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=True,
        )
        rows = {row["task"]: row for row in json.loads(status.stdout)["tasks"]}
        assert rows["tests.apps.reliable.steady"]["data_lost_at"] is not None
        time.sleep(2)  # several more heartbeats: the loss is reported once, not on every beat
        assert worker.output().count(lost) == 1
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        server.terminate()
        server.wait(10)
