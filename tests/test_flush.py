"""Why a batch was small, and what an autoscaler reads: flush reasons and the backlog gauges, on real workers.

Each reason is produced by a task set up for it (``tests/apps/tuned.py``) and read back as a user reads it: the
``reason`` label of the worker's Prometheus metrics, and ``batching status --json``, whose per-reason counts the
consumers keep in Redis (so they outlive the worker that ran the batches).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import redis

from batching import queue_status
from batching.redis_server import free_port
from batching.store.keys import QueueKeys
from batching.store.queue import Finish, QueueStore
from batching.store.snapshot import status_of
from tests.conftest import ROOT
from tests.test_metrics import scrape
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration

APP = "tests.apps.tuned"


def fresh_app(rclient: redis.Redis) -> ModuleType:
    """The app, with every key of its queues, its flush counts and its gate deleted first."""
    module = importlib.import_module(APP)
    for pattern in ("*flush.*", "tuned:*"):
        for key in rclient.scan_iter(match=pattern):
            rclient.delete(key)
    return module


@pytest.fixture
def app(redis_url: str, rclient: redis.Redis) -> ModuleType:
    return fresh_app(rclient)


Metrics = dict[tuple[str, tuple], float]


def scraped_when(port: int, ok: Callable[[Metrics], bool], timeout: float, what: str) -> Metrics:
    """The worker's metrics once ``ok`` holds for them."""
    return poll_until(lambda: m if ok(m := scrape(port)) else None, timeout, what,
                      detail=lambda: str(scrape(port)))


def by_reason(m: dict[tuple[str, tuple], float], task: str) -> dict[str, float]:
    """``batching_batches_total`` of ``task`` by its ``reason`` label."""
    out = {}
    for (name, labels), value in m.items():
        got = dict(labels)
        if name == "batching_batches_total" and got["task"] == task:
            out[got["reason"]] = value
    return out


def status(redis_url: str) -> dict[str, dict[str, Any]]:
    """``batching status -A tests.apps.tuned --json``, by task."""
    done = subprocess.run([sys.executable, "-m", "batching.cli", "status", "-A", APP, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    return {row["task"]: row for row in json.loads(done.stdout)["tasks"]}


def metrics_worker(start_worker: Any) -> tuple[Any, int]:
    port = free_port()
    env = {"BATCHING_METRICS_PORT": str(port), "BATCHING_METRICS_ADDR": "127.0.0.1"}
    return start_worker(APP, "--pool", "solo", env=env).ready(), port


def test_each_batch_says_why_it_was_flushed(app, start_worker, redis_url):
    worker, port = metrics_worker(start_worker)

    full = app.full.submit_many([{"x": i} for i in range(8)])  # batch_size 4, max_delay 5 s: two full batches
    assert [r.get(timeout=30) for r in full] == list(range(8))
    trickle = []
    for i in range(3):  # max_delay 0.3 s, batch_size 32: the wait ends first
        trickle.append(app.trickle.delay(x=i))
        time.sleep(0.05)
    assert [r.get(timeout=30) for r in trickle] == [0, 1, 2]
    assert app.greedy.delay(x=7).get(timeout=30) == 7  # max_delay 0: whatever is queued, at once

    expected = {"flush.full": {"count": 2}, "flush.trickle": {"max_delay": 1}, "flush.greedy": {"empty": 1}}
    m = scraped_when(port, lambda m: all(by_reason(m, t) == want for t, want in expected.items()), 10,
                     "the batches to be counted by reason")
    sizes = {(dict(labels)["task"], dict(labels)["reason"]): v for (name, labels), v in m.items()
             if name == "batching_batch_size_sum"}
    assert sizes[("flush.full", "count")] == 8 and sizes[("flush.trickle", "max_delay")] == 3

    rows = status(redis_url)  # the recent window, kept in Redis by the consumers
    assert {t: rows[t]["flush_reasons"] for t in expected} == expected
    assert rows["flush.full"]["flush_window_s"] == 300
    assert worker.stop() == 0


def test_a_batch_cut_short_by_a_warm_shutdown_runs_and_says_shutdown(app, start_worker, redis_url):
    worker = start_worker(APP, "--pool", "solo").ready()
    results = [app.patient.delay(x=i) for i in range(3)]  # batch_size 32, max_delay 60 s: still forming
    wait_until(lambda: queue_status(app.patient).in_flight == 3, 30, "the three requests to be claimed")

    assert worker.stop(signal.SIGTERM) == 0, worker.output()
    assert [r.get(timeout=10) for r in results] == [1, 2, 3]  # run at shutdown, not handed back
    row = status(redis_url)["flush.patient"]
    assert row["flush_reasons"] == {"shutdown": 1}
    assert (row["depth"], row["in_flight"], row["batches"]) == (0, 0, 1)


def test_backlog_counts_claimed_requests_and_the_oldest_request_ages(app, start_worker, redis_url, rclient):
    queued = app.gated.submit_many([{"x": i} for i in range(20)])  # before any worker: all waiting
    worker, port = metrics_worker(start_worker)
    task = (("task", "flush.gated"),)

    # The model holds its first batch of 4 at the gate and the fetch thread has the next 4 in hand: 8 in flight,
    # which the queue's lists no longer hold.
    first = scraped_when(port, lambda m: m[("batching_in_flight", task)] == 8, 30, "two batches of 4 to be claimed")
    assert first[("batching_queue_depth", task)] == 12
    assert sum(rclient.llen(key) for key in rclient.scan_iter(match="batching.flush.gated*")) == 12
    assert first[("batching_backlog", task)] == 20  # waiting plus in flight: what LLEN alone misses
    age = first[("batching_oldest_request_age_seconds", task)]
    assert age > 0

    time.sleep(1.0)
    later = scrape(port)
    assert later[("batching_backlog", task)] == 20
    assert later[("batching_oldest_request_age_seconds", task)] >= age + 0.9  # nothing finished: it grows
    row = status(redis_url)["flush.gated"]
    assert (row["backlog"], row["depth"], row["in_flight"]) == (20, 12, 8)
    assert row["oldest_request_age_s"] >= age + 0.9

    rclient.set(app.GATE, 1)
    assert [r.get(timeout=30) for r in queued] == list(range(20))
    done = scraped_when(port, lambda m: m[("batching_backlog", task)] == 0, 10, "the backlog to drain")
    assert done[("batching_oldest_request_age_seconds", task)] == 0
    assert worker.stop() == 0


# -- what the consumers keep in Redis for it ---------------------------------------------------------------------


@pytest.fixture
def store(rclient: redis.Redis) -> QueueStore:
    return QueueStore(rclient, QueueKeys(f"test-flush-{uuid.uuid4().hex[:12]}"), lease_s=30.0)


def finish_one(store: QueueStore, reason: str, ran: int = 1) -> None:
    store.client.lpush(store.keys.main, uuid.uuid4().hex)
    claim = store.new_claim()
    assert store.claim(claim, 1) == 1
    assert store.finish(claim, Finish(ran=ran, flush_reason=reason))


def test_flush_reasons_are_counted_per_batch_in_a_window_that_expires_by_itself(store: QueueStore) -> None:
    for reason in ("count", "count", "max_delay"):
        finish_one(store, reason)
    finish_one(store, "empty", ran=0)  # nothing ran (all revoked, say): not a batch
    now = store.now()
    store.client.hset(store.keys.flushes(now - 400), "shutdown", 5)  # a minute that has left the window

    snap = status_of(store, "t", now=now)
    assert snap.flush_reasons == {"count": 2, "max_delay": 1}
    assert (snap.batches, snap.requests) == (3, 3)
    assert 300 < store.client.ttl(store.keys.flushes(now)) <= 360


def test_consumers_report_their_values_until_they_leave_or_are_long_gone(store: QueueStore) -> None:
    store.heartbeat("c1", [], '{"batch_size":8,"max_delay":0.005}')
    store.client.zadd(store.keys.consumers, {"gone": time.time() - 11 * store.lease_s})
    store.client.hset(store.keys.tuning, "gone", '{"batch_size":32,"max_delay":0.3}')
    assert status_of(store, "t").tuning == {"c1": {"batch_size": 8, "max_delay": 0.005}}  # live consumers only

    store.heartbeat("c2", [], '{"batch_size":32,"max_delay":0.3}')  # prunes consumers gone for ten leases
    assert not store.client.hexists(store.keys.tuning, "gone")
    store.report_tuning("c2", '{"batch_size":4,"max_delay":0}')
    store.leave("c1")
    assert status_of(store, "t").tuning == {"c2": {"batch_size": 4, "max_delay": 0}}
