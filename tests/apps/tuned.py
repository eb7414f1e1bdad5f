"""The app of the flush-reason, autoscaling-gauge and live-tuning tests, run under real ``celery worker``s.

Each task is set up to flush for one reason; ``gated`` holds its batch until the test opens the gate; ``tuned``
records the size of every batch it runs, with the worker's pid, for ``batching_set``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("tuned", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)

#: Set by the test to let ``gated`` return.
GATE = "tuned:gate"


@batched(app, name="flush.full", batch_size=4, max_delay=5.0)
def full(x):
    return x


@batched(app, name="flush.trickle", batch_size=32, max_delay=0.3)
def trickle(x):
    return x


@batched(app, name="flush.greedy", batch_size=32)
def greedy(x):
    return x


@batched(app, name="flush.patient", batch_size=32, max_delay=60.0)
def patient(x):
    return [v + 1 for v in x]


@batched(app, name="flush.gated", batch_size=4)
def gated(x):
    deadline = time.monotonic() + 60
    while not R.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


@batched(app, name="flush.tuned", batch_size=32, max_delay=0.3)
def tuned(x):
    time.sleep(0.05)  # long enough that both workers get batches of every round
    R.rpush("tuned:sizes", f"{os.getpid()}:{len(x)}")
    return x
