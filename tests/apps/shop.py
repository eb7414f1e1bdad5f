"""The app the integration tests run under a real ``celery worker``: one batched task per behaviour under test."""

from __future__ import annotations

import os

import redis
from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("shop", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


class ModelError(Exception):
    """Raised by the whole-batch failure model; importable by the client, so get() re-raises this type."""


@batched(app, batch_size=16, max_delay=0.05)
def predict(text, scale=1.0, suffix=""):
    """Every parameter arrives as a list; a falsy default ("") must reach us as a value, never as 'missing'."""
    return [f"{t.upper()}{suffix}" if s == 1.0 else f"{t.upper()}*{s}{suffix}" for t, s, suffix in
            zip(text, scale, suffix, strict=True)]


@batched(app, batch_size=8, max_delay=0.02)
def picky(x):
    """Per-item errors: negative inputs fail alone, with their own exception instance."""
    return [ValueError(f"negative input {v}") if v < 0 else v * 2 for v in x]


@batched(app, batch_size=8, max_delay=0.02)
def explode(x):
    raise ModelError(f"model crashed on a batch of {len(x)}")


@batched(app, batch_size=8, max_delay=0.02)
def short(x):
    return x[:-1]


class CountingModel:
    """Counts its constructions (per process) in Redis, so tests see where and how often it loads."""

    def __init__(self) -> None:
        redis.Redis.from_url(URL).hincrby("shop:model_loads", str(os.getpid()), 1)

    def run(self, text, flag=False, limit=0, tag=None):
        return self.run_batch([text], [flag], [limit], [tag])[0]

    def run_batch(self, text, flag, limit, tag):
        return [{"text": t, "flag": f, "limit": n, "tag": g} for t, f, n, g in zip(text, flag, limit, tag, strict=True)]


counting = batched(app, model=CountingModel, name="shop.counting", batch_size=32, max_delay=0.01)


@app.task
def add(x, y):
    return x + y


R = redis.Redis.from_url(URL)


@app.task
def postprocess(value):
    return f"<{value}>"


@app.task
def collect(values):
    return sorted(values)


@app.task
def on_error(request, exc, traceback):
    """A link_error errback with Celery's (request, exc, traceback) signature."""
    R.rpush("shop:errbacks", f"{request.id}:{type(exc).__name__}")


class Flaky(Exception):
    pass


@batched(app, batch_size=8, max_delay=0.02, autoretry_for=(Flaky,), max_retries=2, default_retry_delay=0.3)
def flaky(x):
    """Each input fails on its first attempt only."""
    attempts = [R.hincrby("shop:flaky", str(v), 1) for v in x]
    return [Flaky(f"attempt {n} of {v}") if n < 2 else f"ok:{v}" for v, n in zip(x, attempts, strict=True)]


@batched(app, batch_size=8, max_delay=0.02, autoretry_for=(Flaky,), max_retries=1, default_retry_delay=0.1)
def hopeless(x):
    return [Flaky(f"never works: {v}") for v in x]


#: The bound of ``bounded``'s queue: the admission tests fill it from many clients at once.
BOUND = 40


@batched(app, batch_size=16, max_delay=0.0, max_queue_size=BOUND)
def bounded(x):
    """Records every input it runs, so tests can tell what reached the model and what never did."""
    R.rpush("shop:bounded_ran", *x)
    return [v * 10 for v in x]


@batched(app, batch_size=4, max_delay=0.0)
def sleepy(x):
    """Takes long enough for a caller to give up while it runs."""
    import time

    time.sleep(1.0)
    return list(x)
