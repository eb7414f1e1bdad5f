"""The app the coalescing tests run under real workers: a ``coalesce=True`` task whose model records every input
it sees and can be held mid-batch by the test (so a kill or a revoke lands while the owner's batch runs).

``COALESCE_RATE`` (environment) sets the task's rate limit in that worker only: "1/m" lets a worker claim one
request and then leaves the rest to the other worker, which is how the tests put followers on another worker.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("coalescing", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)

#: List: every input ``run_batch`` was called with, one entry per input per call.
SEEN = "coal:seen"
#: While this key exists, a batch holding an input that starts with "hold" waits (up to a minute).
HOLD = "coal:hold"
#: List: pids of the processes whose model is waiting on HOLD.
HELD = "coal:held"


class Refused(ValueError):
    """What the model returns for the input "boom"."""


@batched(app, name="coal.shout", batch_size=16, max_delay=0.3, lease_s=2.0, coalesce=True,
         rate_limit=os.environ.get("COALESCE_RATE"))
def shout(text, times=1):
    R.rpush(SEEN, *text)
    if any(t.startswith("hold") for t in text):
        R.rpush(HELD, os.getpid())
        deadline = time.monotonic() + 60
        while R.exists(HOLD) and time.monotonic() < deadline:
            time.sleep(0.01)
    return [Refused(f"{t} is refused") if t == "boom" else t.upper() * n for t, n in zip(text, times, strict=True)]
