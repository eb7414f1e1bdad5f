"""The app the cost-budget and bucketing tests run under a real ``celery worker``.

Every model records each batch it ran (its inputs, when it started) in Redis, so a test can check what
``run_batch`` really saw: the batch's total cost, its order, which requests went together.
"""

from __future__ import annotations

import json
import math
import os
import time

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("costed", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)

#: Each model's batches, as JSON ``{"x": [...], "at": unix time}``, under ``cost:batches:<task name>``.
BATCHES = "cost:batches:"


def words(text: str) -> int:
    """A request's cost: its word count, as a tokenizer's length would be."""
    return len(text.split())


def _record(name: str, inputs: list) -> None:
    R.rpush(BATCHES + name, json.dumps({"x": inputs, "at": time.time()}))


@batched(app, name="cost.summed", batch_size=16, max_delay=0.2, cost=words, max_batch_cost=20)
def summed(text, scale=1):
    _record("cost.summed", text)
    return [words(t) * s for t, s in zip(text, scale, strict=True)]


@batched(app, name="cost.padded", batch_size=16, max_delay=0.2, cost=words, max_batch_cost=24, padded=True)
def padded(text):
    _record("cost.padded", text)
    return [words(t) for t in text]


def _picky(text: str, scale: float = 1) -> float:
    """Costs that a bad input makes unusable: a text "raise" makes it raise, "nan" return NaN."""
    if text == "raise":
        raise RuntimeError("cannot measure this text")
    return math.nan if text == "nan" else words(text) * scale


@batched(app, name="cost.picky", batch_size=16, max_delay=0.05, cost=_picky, max_batch_cost=50)
def picky(text, scale=1):
    _record("cost.picky", text)
    return [t.upper() for t in text]


#: Seconds each bucketed batch takes, so a steady stream keeps the window busy.
BUCKET_BATCH_S = 0.05


@batched(app, name="cost.bucketed", batch_size=8, max_delay=0.3, cost=words, max_batch_cost=32, padded=True,
         bucket=True)
def bucketed(text):
    _record("cost.bucketed", text)
    time.sleep(BUCKET_BATCH_S)
    return [words(t) for t in text]


#: Set by the model once the first slow batch has started.
SLOW_STARTED = "cost:slow:started"
#: An app of its own (``celery -A tests.apps.costed:slow_app``) and a task not shared with ``app`` (Celery shares
#: tasks with every app by default), so the worker the other tests share never takes its requests.
slow_app = Celery("costed-slow", broker=URL, backend=URL)
slow_app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


@batched(slow_app, name="cost.slow", batch_size=4, max_delay=0.05, cost=words, max_batch_cost=3, shared=False)
def slow(text):
    _record("cost.slow", text)
    R.set(SLOW_STARTED, 1)
    time.sleep(1.0)
    return [words(t) for t in text]
