"""The app the control tests (inspect, revoke, rate limits, purge, routing) run under a real ``celery worker``.

Models record what they ran in Redis, and ``gated`` / ``plain_gated`` block until the test opens their gate, so a
test can look at a batch while it runs.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("controlled", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)

#: Set by the test to let gated models return.
GATE = "ctl:gate"


def _wait_for_gate() -> None:
    deadline = time.monotonic() + 60
    while not R.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.01)


@batched(app, name="ctl.gated", batch_size=8, max_delay=0.2)
def gated(x):
    R.rpush("ctl:gated_ran", *x)
    _wait_for_gate()
    return [v * 10 for v in x]


@app.task(name="ctl.plain_gated")
def plain_gated(x):
    """The plain task the batched one is compared with."""
    R.rpush("ctl:plain_ran", x)
    _wait_for_gate()
    return x * 10


@batched(app, name="ctl.limited", batch_size=16, max_delay=0.05, rate_limit="5/s")
def limited(x):
    now = time.time()
    R.rpush("ctl:limited_at", *[now] * len(x))
    return x


@batched(app, name="ctl.echo", batch_size=32, max_delay=0.3)
def echo(x):
    R.rpush("ctl:echo_sizes", len(x))
    R.rpush("ctl:echo_ran", *x)
    return x


class Scorer:
    """Records the pid of every process that builds it: the model must only ever be built by the consumer."""

    def __init__(self) -> None:
        R.rpush("ctl:scorer_built_in", os.getpid())

    def run(self, x):
        return self.run_batch([x])[0]

    def run_batch(self, x):
        return [v + 0.5 for v in x]


scorer = batched(app, model=Scorer, name="ctl.scorer", batch_size=32, max_delay=0.05)


@app.task(name="ctl.plain_echo")
def plain_echo(x):
    R.rpush("ctl:plain_echo_ran", x)
    return x
