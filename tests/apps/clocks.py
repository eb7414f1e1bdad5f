"""An app for workers whose clocks disagree: every run is recorded with Redis's own time, the one true clock."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from batching import batched

#: This worker's clock is off by this many seconds (a host without NTP). Applied to ``time.time``, the clock every
#: host-time decision in a worker reads (libfaketime 0.9.10 cannot be used: it breaks Python 3.11's sleeps, whose
#: clock_nanosleep calls then fail with EINVAL or never return).
SKEW_S = float(os.environ.get("CLOCK_SKEW_S", "0"))
if SKEW_S:
    _host_time = time.time
    time.time = lambda: _host_time() + SKEW_S

URL = os.environ["REDIS_URL"]
app = Celery("clocks", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)


@batched(app, batch_size=16, max_delay=0.0, lease_s=3.0, name="clocks.stamp")
def stamp(x):
    """Slow enough (20 ms a batch) that claims are in flight while other consumers recover expired ones."""
    time.sleep(0.02)
    seconds, micros = R.time()
    with R.pipeline(transaction=False) as pipe:
        for v in x:
            pipe.hset("clocks:ran_at", v, seconds + micros / 1e6)
            pipe.hincrby("clocks:runs", v, 1)
        pipe.execute()
    return x


@batched(app, batch_size=8, max_delay=0.05, lease_s=2.0, name="clocks.tag")
def tag(x):
    """Tags each input with the worker's pid. The first call ever holds until the test releases it, so its worker
    can be paused (as a partition would cut it off) while it holds a claim."""
    if R.incr("clocks:tag_calls") == 1:
        while not R.exists("clocks:release"):
            time.sleep(0.01)
    return [f"{os.getpid()}:{v}" for v in x]
