"""Workers on hosts whose clocks disagree: one worker's clock is shifted by ±30 s (see ``tests/apps/clocks.py``).

Every lease, heartbeat, recovery and ETA decision is made by Redis's clock, so a skewed host neither steals live
claims, nor runs countdown tasks early, nor revokes fresh tasks as expired.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import states

from batching.redis_server import find_redis_server, free_port
from tests import netns
from tests.conftest import Worker
from tests.test_reliability import _pings
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.hosts]

def skewed(offset: str) -> dict[str, str]:
    """Environment that runs a worker whose clock is off by ``offset`` seconds ("+30", "-30")."""
    return {"CLOCK_SKEW_S": offset}


@pytest.fixture
def clocks(redis_url: str, rclient: redis.Redis):
    module = importlib.import_module("tests.apps.clocks")
    for key in [*rclient.scan_iter(match="*clocks*")]:
        rclient.delete(key)
    return module


def redis_now(rclient: redis.Redis) -> float:
    seconds, micros = rclient.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("offset", ["+30", "-30"])
def test_a_skewed_host_steals_no_live_claim_and_runs_nothing_twice(clocks, start_worker, rclient, offset) -> None:
    calm = start_worker("tests.apps.clocks", "--pool", "solo").ready()
    skew = start_worker("tests.apps.clocks", "--pool", "solo", env=skewed(offset)).ready()
    n = 1500
    results = [clocks.stamp.delay(x=i) for i in range(n)]
    assert [r.get(timeout=60) for r in results] == list(range(n))
    runs = {int(k): int(v) for k, v in rclient.hgetall("clocks:runs").items()}
    assert sorted(runs) == list(range(n))
    assert [k for k, v in runs.items() if v > 1] == []
    for worker in (calm, skew):
        assert "re-queued" not in worker.output()


def test_countdown_and_expires_follow_redis_s_clock_on_a_fast_host(clocks, start_worker, rclient) -> None:
    start_worker("tests.apps.clocks", "--pool", "solo", env=skewed("+30")).ready()
    sent = redis_now(rclient)
    later = [clocks.stamp.apply_async(kwargs={"x": 1000 + i}, countdown=4) for i in range(10)]
    fresh = [clocks.stamp.apply_async(kwargs={"x": 2000 + i}, expires=20) for i in range(10)]
    assert [r.get(timeout=30) for r in fresh] == [2000 + i for i in range(10)]  # not REVOKED as "expired"
    assert all(r.state == states.SUCCESS for r in fresh)
    assert [r.get(timeout=30) for r in later] == [1000 + i for i in range(10)]
    ran_at = {int(k): float(v) for k, v in rclient.hgetall("clocks:ran_at").items()}
    early = [x for x in range(1000, 1010) if ran_at[x] < sent + 4 - 0.05]
    assert early == []


def test_a_dead_consumer_s_claims_come_back_within_the_lease_whatever_the_clocks(clocks, start_worker, rclient):
    # The fast host (+30 s) dies holding claims; the recovering host's clock is slow (-30 s). By Redis's clock the
    # work is back within about 1.25 leases (3 s) plus a restart, not a minute late.
    fast = start_worker("tests.apps.clocks", "--pool", "solo", env=skewed("+30")).ready()
    results = [clocks.stamp.delay(x=i) for i in range(3000)]
    wait_until(lambda: int(rclient.hlen("clocks:runs")) > 100, 30, "the fast worker to be running batches")
    fast.stop(signal.SIGKILL)
    killed = time.monotonic()
    start_worker("tests.apps.clocks", "--pool", "solo", env=skewed("-30")).ready()
    assert [r.get(timeout=60) for r in results] == list(range(3000))
    assert time.monotonic() - killed < 20


def test_a_consumer_cut_off_past_its_lease_never_stores_over_the_run_that_replaced_it(clocks, start_worker, rclient):
    cut = start_worker("tests.apps.clocks", "--pool", "solo").ready()
    results = [clocks.tag.delay(x=i) for i in range(8)]
    wait_until(lambda: rclient.get("clocks:tag_calls") == b"1", 30, "the first worker to be running the batch")
    os.killpg(cut.proc.pid, signal.SIGSTOP)  # no heartbeat, no progress: its lease runs out as in a partition
    try:
        healthy = start_worker("tests.apps.clocks", "--pool", "solo").ready()
        values = [r.get(timeout=30) for r in results]
        healthy_pid = int(values[0].split(":")[0])
        assert values == [f"{healthy_pid}:{i}" for i in range(8)]
    finally:
        rclient.set("clocks:release", 1)
        os.killpg(cut.proc.pid, signal.SIGCONT)
    wait_until(lambda: "dropped the 8 outcome(s) of this late run" in cut.output(), 30, "the late run to be dropped",
               detail=cut.output)
    stored = [clocks.app.AsyncResult(r.id).get(timeout=5) for r in results]
    assert stored == values  # the late run of the cut-off worker stored nothing
    assert healthy.proc.poll() is None


def _submit(url: str, n: int) -> list[str]:
    """Send ``n`` stamp tasks from a client process bound to ``url``; their ids."""
    done = subprocess.run(
        [sys.executable, "-c", "from tests.apps import clocks\n"
         f"for i in range({n}): print(clocks.stamp.delay(x=i).id)"],
        env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=True, timeout=60,
    )
    return done.stdout.split()


def _succeeded(client: redis.Redis, ids: list[str]) -> int:
    metas = client.mget([f"celery-task-meta-{i}" for i in ids])
    return sum(1 for m in metas if m and json.loads(m)["status"] == states.SUCCESS)


def test_a_silent_partition_is_noticed_in_seconds_and_nothing_is_lost(tmp_path: Path) -> None:
    why = netns.available()
    if why:
        pytest.fail(f"network namespaces are needed for this test ({why}); .ci/run provides them")
    with netns.host(1) as far_host:
        port = free_port()
        server = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", far_host.here, "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        near_url, far_url = f"redis://127.0.0.1:{port}/0", f"redis://{far_host.here}:{port}/0"
        client = redis.Redis.from_url(near_url)
        try:
            wait_until(lambda: _pings(near_url), 10, "redis-server to start")
            far = Worker("tests.apps.clocks", far_url, tmp_path / "far.log", "--pool", "solo", prefix=far_host.prefix)
            near = Worker("tests.apps.clocks", near_url, tmp_path / "near.log", "--pool", "solo")
            try:
                far.ready(), near.ready()
                ids = _submit(near_url, 4000)
                wait_until(lambda: "clocks.stamp" in far.output() and client.hlen("clocks:runs") > 300, 30,
                           "both workers to be running batches")
                far_host.cut()
                cut_at = time.monotonic()
                wait_until(lambda: "Redis unreachable" in far.output(), 15, "the cut-off worker to notice",
                           detail=far.output)
                noticed_s = time.monotonic() - cut_at
                time.sleep(max(0.0, 8 - noticed_s))  # the partition lasts well past the 3 s lease
                far_host.heal()
                wait_until(lambda: _succeeded(client, ids) == len(ids), 60, "every task to succeed")
                wait_until(lambda: "Redis is back" in far.output(), 30, "the cut-off worker to be back",
                           detail=far.output)
            finally:
                far.stop()
                near.stop()
            print(f"silent partition of 8 s: noticed after {noticed_s:.1f} s; 4000 sent, "
                  f"{4000 - _succeeded(client, ids)} lost, {sum(1 for v in client.hvals('clocks:runs') if int(v) > 1)} "
                  "ran twice")
            assert noticed_s < 6, noticed_s
            runs = {int(k): int(v) for k, v in client.hgetall("clocks:runs").items()}
            assert sorted(runs) == list(range(4000))
            twice = [k for k, v in runs.items() if v > 1]
            assert len(twice) <= 3 * 16, len(twice)  # at most what the cut-off worker held: its batches in hand
            assert "re-queued" not in near.output().split("Redis", 1)[0]
        finally:
            server.terminate()
            server.wait(10)
