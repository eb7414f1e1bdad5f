"""The app the reliability tests crash, restart and starve: short leases so recovery happens within seconds."""

from __future__ import annotations

import os
import signal
import time

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("reliable", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)


class PoisonError(Exception):
    """Raised by the model for one particular input."""


@batched(app, batch_size=32, max_delay=0.0, lease_s=2.0)
def work(x):
    """Accelerator-like cost (5 ms + 0.05 ms per item); records every input it runs, to catch double runs."""
    time.sleep(0.005 + 0.00005 * len(x))
    for attempt in range(100):  # the bookkeeping must survive the Redis restarts the tests cause
        try:
            R.rpush("reliable:ran", *x)
            break
        except redis.ConnectionError:
            time.sleep(0.1 * attempt)
    return [v * 10 for v in x]


@batched(app, batch_size=16, max_delay=0.05, lease_s=2.0, max_deliveries=3)
def crashy(x):
    """Kills its own worker process whenever the batch holds "crash": the message a consumer cannot survive."""
    if "crash" in x:
        os.kill(os.getpid(), signal.SIGKILL)
    return [v.upper() for v in x]


@batched(app, batch_size=64, max_delay=0.5)
def poison(x):
    R.incr("reliable:poison_calls")
    if 13 in x:
        raise PoisonError("13 is poison")
    return [v + 1 for v in x]


@batched(app, batch_size=8, time_limit=1.0)
def stuck(seconds):
    """Blocks in one C call (time.sleep): only the hard limit can settle it."""
    time.sleep(max(seconds))
    return seconds


@batched(app, batch_size=8, soft_time_limit=0.5)
def busy(seconds):
    """Python-level work: the soft limit interrupts it with SoftTimeLimitExceeded."""
    deadline = time.monotonic() + max(seconds)
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return seconds


@batched(app, batch_size=8, ignore_result=True)
def quiet(x):
    R.rpush("reliable:quiet", *x)
    return x


@batched(app, batch_size=32, max_delay=0.0, lease_s=2.0)
def steady(x):
    """Accelerator-like cost and no side effects: what runs while Redis refuses writes."""
    time.sleep(0.005 + 0.00005 * len(x))
    return [v * 10 for v in x]
