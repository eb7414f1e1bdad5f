"""The ``batching`` command as a user runs it: a real subprocess against the session's real Redis, no worker.

Messages are queued with ``.delay()`` and, where a test needs dead letters, consumed in this process with a
bounded ``BatchConsumer.drain()`` — no sleeps anywhere.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from batching.redis_server import free_port
from batching.store.keys import QueueKeys
from batching.store.queue import QueueStore
from batching.store.snapshot import status_of
from batching.worker.consumer import BatchConsumer
from tests.conftest import bury

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.cliapp"


def cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batching.cli", *args], cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60,
    )


def ok(*args: str) -> str:
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status() -> dict[str, dict[str, Any]]:
    return {row["task"]: row for row in json.loads(ok("status", "-A", APP, "--json"))["tasks"]}


def drain(task: Any) -> int:
    """Serve the task's queue in this process until it is empty; returns messages claimed."""
    consumer = BatchConsumer.for_task(task)
    try:
        return consumer.drain()
    finally:
        consumer.stop(timeout=0)  # no threads were started: this releases its broker connection


@pytest.fixture
def cliapp(redis_url: str, rclient: redis.Redis) -> ModuleType:
    """The app, with every key of its queues deleted first."""
    module = importlib.import_module(APP)
    for key in rclient.scan_iter(match=f"*{APP}*"):
        rclient.delete(key)
    return module


def test_status_counts_queued_messages_per_task_without_a_worker(cliapp: ModuleType) -> None:
    for i in range(3):
        cliapp.embed.delay(text=f"t{i}")
    cliapp.score.apply_async(kwargs={"x": 1}, priority=5)  # another priority list of the same queue

    rows = status()
    embed, score = rows["tests.apps.cliapp.embed"], rows["tests.apps.cliapp.score"]
    assert (embed["depth"], score["depth"]) == (3, 1)
    assert embed["queue"] == "batching.tests.apps.cliapp.embed"
    assert {k: embed[k] for k in ("in_flight", "claims", "delayed", "dead", "consumers", "batches")} == dict.fromkeys(
        ("in_flight", "claims", "delayed", "dead", "consumers", "batches"), 0
    )
    assert embed["mean_batch_size"] is None
    assert embed["oldest_age_s"] is None or 0 <= embed["oldest_age_s"] < 60  # None until clients send sent_at

    table = ok("status", "-A", APP)
    line, load = [ln for ln in table.splitlines() if "tests.apps.cliapp.embed " in ln]  # two tables
    assert [cell.strip() for cell in line.split("│")][3] == "3"  # │ task │ queue │ depth │ ...
    backlog, age, flushes, values = [cell.strip() for cell in load.split("│")][2:6]
    assert (backlog, flushes, values) == ("3", "-", "-") and age != "-"  # no batch ran, no consumer reported


def test_status_reads_claims_consumers_stats_and_message_age(cliapp: ModuleType, rclient: redis.Redis) -> None:
    store, connection = QueueStore.open(cliapp.app, cliapp.score.batching)
    try:
        now = time.time()
        old = {"body": "", "headers": {"id": "a", "task": cliapp.score.name, "sent_at": now - 90}}
        rclient.lpush(store.keys.main, json.dumps(old), b"newer, no headers")
        claim = store.new_claim()
        store.claim(claim, 1)  # takes the oldest: the one with sent_at
        store.heartbeat("live", [claim.claim_id])
        rclient.zadd(store.keys.consumers, {"gone": now - 3 * store.lease_s})  # lease_s=5: stale after 10 s
        rclient.hset(store.keys.stats, mapping={"size:4": 2, "size:2": 1, "requests": 10})

        snap = status_of(store, cliapp.score.name, now=now)
        assert (snap.depth, snap.claims, snap.in_flight, snap.consumers) == (1, 1, 1, 1)
        assert snap.oldest_age_s is None  # the message left has no sent_at header
        assert (snap.batches, snap.requests, snap.mean_batch_size) == (3, 10, 10 / 3)
        assert snap.batch_sizes == {2: 1, 4: 2}
        assert snap.heartbeat_ages_s["live"] == pytest.approx(0, abs=2)
        assert snap.heartbeat_ages_s["gone"] == pytest.approx(3 * store.lease_s, abs=2)

        store.release([claim.claim_id])
        assert status_of(store, cliapp.score.name, now=now).oldest_age_s == pytest.approx(90)
    finally:
        connection.release()


def test_dead_letters_are_listed_requeued_and_purged(cliapp: ModuleType, rclient: redis.Redis) -> None:
    keys = QueueKeys(cliapp.embed.batching.queue)
    rclient.lpush(keys.main, b"\xff not a kombu message")
    assert drain(cliapp.embed) == 1
    # A message whose task id is readable, dead-lettered the way too many unfinished deliveries do it.
    real = cliapp.embed.delay(text="hello")
    raw = rclient.rpop(keys.main)
    assert isinstance(raw, bytes)
    bury(QueueStore(rclient, keys), "dead-lettered after 3 deliveries", raw)

    (page,) = json.loads(ok("dead-letters", "list", "-A", APP, "--task", "embed", "--json"))["tasks"]
    assert page["total"] == 2
    newest, malformed = page["letters"]
    assert (newest["task_id"], newest["reason"]) == (real.id, "dead-lettered after 3 deliveries")
    assert malformed["task_id"] is None and "undecodable" in malformed["reason"]
    assert "undecodable" in ok("dead-letters", "list", "-A", APP)

    assert "requeued 1 " in ok("dead-letters", "requeue", "-A", APP, "--task", "embed", "--id", real.id)
    assert (rclient.llen(keys.main), rclient.llen(keys.dead)) == (1, 1)
    assert drain(cliapp.embed) == 1
    assert real.get(timeout=10) == 5  # the requeued message is a working task again

    missing = cli("dead-letters", "requeue", "-A", APP, "--task", "embed", "--id", "no-such-id")
    assert missing.returncode == 1 and "no-such-id" in missing.stderr
    assert "requeued 1 " in ok("dead-letters", "requeue", "-A", APP, "--task", "tests.apps.cliapp.embed", "--all")
    assert (rclient.llen(keys.main), rclient.llen(keys.dead)) == (1, 0)
    assert drain(cliapp.embed) == 1  # still malformed: dead-lettered again

    refused = cli("dead-letters", "purge", "-A", APP, "--task", "embed")  # stdin is not a terminal
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert rclient.llen(keys.dead) == 1
    assert "purged 1 " in ok("dead-letters", "purge", "-A", APP, "--task", "embed", "--yes")


def test_unknown_app_or_task_exits_2_naming_it(cliapp: ModuleType) -> None:
    done = cli("status", "-A", "tests.apps.no_such_app")
    assert done.returncode == 2 and "tests.apps.no_such_app" in done.stderr
    done = cli("dead-letters", "purge", "-A", APP, "--task", "nope", "--yes")
    assert done.returncode == 2 and "'nope'" in done.stderr and "tests.apps.cliapp.embed" in done.stderr


def test_app_without_batched_tasks_exits_1(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text("from celery import Celery\napp = Celery('plain', broker='redis://')\n")
    done = cli("status", "-A", "plainapp", cwd=tmp_path)  # found in the current directory, as celery -A does
    assert done.returncode == 1 and "no batched tasks" in done.stderr


def test_unreachable_redis_exits_3_with_the_url_and_no_password(redis_url: str) -> None:
    port = free_port()  # nobody listens on it
    done = cli("status", "-A", APP, REDIS_URL=f"redis://:s3cret@127.0.0.1:{port}/0")
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_bench_runs_from_the_checkout_wherever_it_is_called(tmp_path: Path) -> None:
    done = cli("bench", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "python -m bench" in done.stdout


def test_demo_runs_from_the_checkout_wherever_it_is_called(tmp_path: Path, redis_url: str) -> None:
    # The example app is not installed; the command finds it beside the batching it runs from.
    done = cli("demo", "--n", "40", "--clients", "2", cwd=tmp_path, REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "40 predict.delay() calls" in done.stdout and "batch sizes" in done.stdout
