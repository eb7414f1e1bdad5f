"""Workers on hosts whose clocks disagree: one worker's clock is shifted by ±30 s (see ``tests/apps/clocks.py``).

Every lease, heartbeat, recovery and ETA decision is made by Redis's clock, so a skewed host neither steals live
claims, nor runs countdown tasks early, nor revokes fresh tasks as expired.
"""

from __future__ import annotations

import importlib
import signal
import time

import pytest
import redis
from celery import states

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
