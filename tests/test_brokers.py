"""Broker settings the consumer must honour: Redis Sentinel works, a non-Redis broker fails at start-up."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from batching.redis_server import find_redis_server, free_port
from tests.conftest import ROOT, Worker
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinel_url(redis_url: str, tmp_path: Path):
    host_port = redis_url.split("//")[1].split("/")[0]
    host, port = host_port.split(":")
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster {host} {port} 1\n")
    proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = redis.Redis(port=sentinel_port)

    def knows_master() -> bool:
        try:
            return bool(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"))
        except redis.ConnectionError:
            return False

    try:
        wait_until(knows_master, 10, "the sentinel to know the master", interval=0.05)
        yield f"sentinel://127.0.0.1:{sentinel_port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_sentinel_broker_url_works_end_to_end(redis_url, sentinel_url, tmp_path, monkeypatch):
    monkeypatch.setenv("SENTINEL_URL", sentinel_url)
    worker = Worker("tests.apps.sentinel_app", redis_url, tmp_path / "w.log", "--pool", "solo",
                    env={"SENTINEL_URL": sentinel_url})
    try:
        worker.ready()
        module = importlib.import_module("tests.apps.sentinel_app")
        assert [module.triple.delay(x=i).get(timeout=30) for i in range(5)] == [0, 3, 6, 9, 12]
    finally:
        worker.stop()


def test_non_redis_broker_fails_at_start_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.amqp_app", "worker", "--pool", "solo"],
        cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "needs a Redis broker; this app's broker is 'amqp'" in proc.stdout + proc.stderr
