"""Celery's remote control on batched tasks, against real workers: ``celery inspect``, ``revoke`` (with and without
``terminate``, right after a worker starts, across workers) and ``rate_limit``.

Each test compares with what Celery does for a plain task where the two can be compared in the same worker.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TaskRevokedError

from tests.conftest import ROOT, Worker
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration

APP = "tests.apps.controlled"


@pytest.fixture
def ctl(redis_url: str, rclient: redis.Redis) -> ModuleType:
    module = importlib.import_module(APP)
    rclient.delete(module.GATE, "ctl:gated_ran", "ctl:plain_ran", "ctl:limited_at", "ctl:echo_sizes", "ctl:echo_ran",
                   "ctl:scorer_built_in", "ctl:plain_echo_ran")
    return module


def celery_cli(redis_url: str, *args: str, app: str = APP) -> str:
    """A real ``celery -A app ...`` subprocess; its stdout."""
    done = subprocess.run([sys.executable, "-m", "celery", "-A", app, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "REDIS_URL": redis_url})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def inspect(redis_url: str, worker: Worker, command: str, *args: str) -> Any:
    """``celery inspect <command> --json`` addressed to one worker: that worker's reply."""
    out = celery_cli(redis_url, "inspect", command, *args, "--json", "-d", worker.nodename, "-t", "10")
    return json.loads(out)[worker.nodename]


def running(rclient: redis.Redis, key: str, n: int) -> None:
    wait_until(lambda: rclient.llen(key) >= n, 30, f"{n} item(s) running ({key})")


def test_inspect_shows_the_running_batch_the_claimed_items_and_the_batch_queue(ctl, start_worker, redis_url,
                                                                                rclient):
    worker = start_worker(APP, "--pool", "solo").ready()
    first = ctl.gated.submit_many([{"x": i} for i in range(3)])  # queued together: one batch of 3
    running(rclient, "ctl:gated_ran", 3)  # the model holds the first batch until the gate opens
    waiting = [ctl.gated.delay(x=i) for i in range(10, 12)]
    first_ids, waiting_ids = {r.id for r in first}, {r.id for r in waiting}

    # claimed by the fetch thread for the next batch, not running
    reserved = poll_until(lambda: (got := inspect(redis_url, worker, "reserved")) and
                          {t["id"] for t in got} == waiting_ids and got, 30, "the waiting items to be reserved")
    active = inspect(redis_url, worker, "active")
    assert {t["id"] for t in active} == first_ids
    assert {t["name"] for t in active + reserved} == {"ctl.gated"}
    assert all(t["time_start"] for t in active) and not any(t["time_start"] for t in reserved)
    assert sorted(t["kwargs"]["x"] for t in active) == [0, 1, 2]
    assert all(t["delivery_info"]["routing_key"] == "batching.ctl.gated" for t in active)

    one_active, one_reserved = first[0].id, waiting[0].id
    queried = inspect(redis_url, worker, "query_task", one_active, one_reserved)
    assert queried[one_active][0] == "active" and queried[one_active][1]["name"] == "ctl.gated"
    assert queried[one_reserved][0] == "reserved"

    stats = inspect(redis_url, worker, "stats")
    assert stats["total"].get("ctl.gated") == 3  # as for plain tasks: counted when they start

    queues = {q["name"] for q in inspect(redis_url, worker, "active_queues")}
    assert {"celery", "batching.ctl.gated", "batching.ctl.echo", "batching.ctl.limited"} <= queues

    rclient.set(ctl.GATE, 1)
    assert sorted(r.get(timeout=30) for r in first + waiting) == [0, 10, 20, 100, 110]
    wait_until(lambda: inspect(redis_url, worker, "active") == [], 30, "the worker to look idle again")
    assert inspect(redis_url, worker, "stats")["total"]["ctl.gated"] == 5


def test_revoke_of_a_running_item_ends_as_for_a_plain_task(ctl, start_worker, redis_url, rclient):
    worker = start_worker(APP, "--pool", "threads", "-c", "2").ready()
    plain = ctl.plain_gated.delay(x=7)
    batch = ctl.gated.submit_many([{"x": 1}, {"x": 2}])
    running(rclient, "ctl:plain_ran", 1)
    running(rclient, "ctl:gated_ran", 2)
    replies = ctl.app.control.revoke([plain.id, batch[0].id], reply=True, destination=[worker.nodename], timeout=10)
    assert replies, "the worker did not answer the revoke"
    # Celery leaves a running task alone on a plain revoke: nothing is stored while it runs ...
    assert (plain.state, batch[0].state) == (states.PENDING, states.PENDING)
    rclient.set(ctl.GATE, 1)
    # ... and it ends with its result. The batched item ends exactly like the plain task, never REVOKED first.
    assert plain.get(timeout=30) == 70
    assert batch[0].get(timeout=30) == 10 and batch[1].get(timeout=30) == 20
    assert (plain.state, batch[0].state) == (states.SUCCESS, states.SUCCESS)


def test_terminate_drops_a_running_item_from_its_batch_and_it_stays_revoked(ctl, start_worker, redis_url, rclient):
    worker = start_worker(APP, "--pool", "solo").ready()
    doomed, kept = ctl.gated.submit_many([{"x": 1}, {"x": 2}])
    running(rclient, "ctl:gated_ran", 2)
    ctl.app.control.revoke(doomed.id, terminate=True, reply=True, destination=[worker.nodename], timeout=10)
    # REVOKED at once, while the batch still runs: a waiting get() raises now
    assert doomed.state == states.REVOKED
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=5)
    rclient.set(ctl.GATE, 1)
    assert kept.get(timeout=30) == 20  # the batch itself was not killed
    wait_until(lambda: inspect(redis_url, worker, "active") == [], 30, "the batch to be settled")
    assert ctl.app.AsyncResult(doomed.id).state == states.REVOKED  # never overwritten by the batch's answer


def test_an_item_revoked_after_its_claim_never_runs_and_stays_revoked(ctl, start_worker, redis_url, rclient):
    worker = start_worker(APP, "--pool", "solo").ready()
    first = ctl.gated.delay(x=1)
    running(rclient, "ctl:gated_ran", 1)
    later = [ctl.gated.delay(x=v) for v in (5, 6)]
    poll_until(lambda: len(inspect(redis_url, worker, "reserved")) == 2, 30, "the next batch to be claimed")
    ctl.app.control.revoke(later[0].id, reply=True, destination=[worker.nodename], timeout=10)
    assert later[0].state == states.REVOKED
    rclient.set(ctl.GATE, 1)
    assert first.get(timeout=30) == 10 and later[1].get(timeout=30) == 60
    assert later[0].state == states.REVOKED
    assert 5 not in {int(v) for v in rclient.lrange("ctl:gated_ran", 0, -1)}


def test_revokes_synced_from_a_peer_at_start_are_honoured_before_anything_is_claimed(ctl, start_worker, redis_url,
                                                                                      rclient):
    """A worker that starts while its peers hold revokes (mingle) claims nothing before it has them: 5 of 5
    REVOKED, the body never ran. Before, its consumers claimed and ran them ~1 s before it synced."""
    rclient.delete("ctl:plain_echo_ran")
    # a peer on the same broker that serves none of these tasks (not even the default queue)
    peer = start_worker("tests.apps.slim", "--pool", "solo", "-Q", "peer-only").ready()
    ids = [f"early-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    plain_ids = [f"plain-{task_id}" for task_id in ids]
    replies = ctl.app.control.revoke(ids + plain_ids, reply=True, destination=[peer.nodename], timeout=10)
    assert replies
    for i, (task_id, plain_id) in enumerate(zip(ids, plain_ids, strict=True)):
        ctl.echo.apply_async(kwargs={"x": f"revoked-{i}"}, task_id=task_id)
        ctl.plain_echo.apply_async(kwargs={"x": f"revoked-{i}"}, task_id=plain_id)  # the plain task, compared
    fresh = ctl.echo.delay(x="fresh")
    start_worker(APP, "--pool", "solo", mingle=True).ready()
    assert fresh.get(timeout=30) == "fresh"
    results = [ctl.app.AsyncResult(i) for i in ids + plain_ids]
    wait_until(lambda: all(r.state == states.REVOKED for r in results), 30, "the revoked items to be settled",
               detail=lambda: str([r.state for r in results]))
    assert {v.decode() for v in rclient.lrange("ctl:echo_ran", 0, -1)} == {"fresh"}
    assert rclient.llen("ctl:plain_echo_ran") == 0


def test_a_revoke_reaches_every_worker_serving_the_queue(ctl, start_worker, redis_url, rclient):
    workers = [start_worker(APP, "--pool", "solo") for _ in range(2)]
    for w in workers:
        w.ready()
    ids = [f"both-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)]
    replies = ctl.app.control.revoke(ids, reply=True, destination=[w.nodename for w in workers], timeout=10)
    assert {name for reply in replies for name in reply} == {w.nodename for w in workers}
    for i, task_id in enumerate(ids):
        ctl.echo.apply_async(kwargs={"x": f"r{i}"}, task_id=task_id)
    kept = [ctl.echo.delay(x=f"k{i}") for i in range(6)]
    assert [r.get(timeout=30) for r in kept] == [f"k{i}" for i in range(6)]
    results = [ctl.app.AsyncResult(i) for i in ids]
    wait_until(lambda: all(r.state == states.REVOKED for r in results), 30, "the revoked items to be settled")
    assert not any(v.startswith(b"r") for v in rclient.lrange("ctl:echo_ran", 0, -1))


def test_rate_limit_spaces_items_out_per_worker_like_a_plain_task(ctl, start_worker, rclient):
    start_worker(APP, "--pool", "solo").ready()
    results = ctl.limited.submit_many([{"x": i} for i in range(20)])
    assert sorted(r.get(timeout=60) for r in results) == list(range(20))
    stamps = sorted(float(v) for v in rclient.lrange("ctl:limited_at", 0, -1))
    assert len(stamps) == 20
    # 5/s with Celery's one-token bucket: the first item at once, then one every 0.2 s (plain Celery: 3.8 s)
    assert 3.4 <= stamps[-1] - stamps[0] <= 8.0, stamps[-1] - stamps[0]


def test_celery_control_rate_limit_changes_a_batched_task_live(ctl, start_worker, rclient):
    worker = start_worker(APP, "--pool", "solo").ready()
    replies = ctl.app.control.rate_limit("ctl.echo", "4/s", reply=True, destination=[worker.nodename], timeout=10)
    assert replies and "new rate limit set successfully" in json.dumps(replies)
    started = time.monotonic()
    results = [ctl.echo.delay(x=f"slow{i}") for i in range(9)]
    assert [r.get(timeout=30) for r in results] == [f"slow{i}" for i in range(9)]
    assert time.monotonic() - started >= 1.8  # 4/s: the first at once, then one every 0.25 s
    sizes = [int(n) for n in rclient.lrange("ctl:echo_sizes", 0, -1)]
    ctl.app.control.rate_limit("ctl.echo", "", reply=True, destination=[worker.nodename], timeout=10)
    fast = [ctl.echo.delay(x=f"fast{i}") for i in range(20)]
    assert [r.get(timeout=30) for r in fast] == [f"fast{i}" for i in range(20)]
    assert max(int(n) for n in rclient.lrange("ctl:echo_sizes", len(sizes), -1)) > 1  # batching again
