"""A worker app whose signal receivers record, in Redis, every task signal they get and what ``task.request`` held.

One plain task runs next to the batched ones, so the tests compare a batched item's signals with Celery's own.
One receiver always raises: Celery logs it, and nothing else may change. The receivers are connected when the
worker starts, so a test process importing the app to send tasks records nothing itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, signals

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("signalled", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)
LOG = "signalled:log"


def _record(signal: str, task_id: Any, **fields: Any) -> None:
    R.rpush(LOG, json.dumps({"signal": signal, "id": task_id, **fields}, default=repr))


def _seen(task: Any) -> dict[str, Any]:
    """What a receiver reading ``task.request`` sees (OpenTelemetry reads headers as attributes, Sentry ``headers``)."""
    request = task.request
    return {"request_id": request.id, "tag": getattr(request, "x_tag", None),
            "headers_tag": (request.headers or {}).get("x_tag"), "queue": (request.delivery_info or {}).get(
                "routing_key"), "hostname": request.hostname}


def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    _record("received", request.id, name=request.name)


def on_prerun(sender: Any = None, task_id: Any = None, task: Any = None, args: Any = None, kwargs: Any = None,
              **_: Any) -> None:
    _record("prerun", task_id, kwargs=kwargs, **_seen(task))


def on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    _record("success", sender.request.id, result=result, **_seen(sender))


def on_failure(sender: Any = None, task_id: Any = None, exception: Any = None, einfo: Any = None, **_: Any) -> None:
    _record("failure", task_id, exc_type=type(exception).__name__, exc=str(exception),
            einfo_type=type(einfo.exception.exc).__name__, einfo_traceback=einfo.traceback, **_seen(sender))


def on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    _record("retry", request.id, reason=str(reason), **_seen(sender))


def on_revoked(sender: Any = None, request: Any = None, expired: Any = None, terminated: Any = None,
               **_: Any) -> None:
    _record("revoked", request.id, expired=expired, terminated=terminated)


def on_postrun(sender: Any = None, task_id: Any = None, task: Any = None, retval: Any = None, state: Any = None,
               **_: Any) -> None:
    _record("postrun", task_id, state=state, retval=retval, **_seen(task))


def broken_receiver(**_: Any) -> None:
    raise RuntimeError("a receiver with a bug")


@signals.worker_init.connect
def connect_receivers(**_: Any) -> None:
    """Only in the worker: a test process that imports this app to send tasks must not record its own signals."""
    for signal, receiver in ((signals.task_received, on_received), (signals.task_prerun, on_prerun),
                             (signals.task_success, on_success), (signals.task_failure, on_failure),
                             (signals.task_retry, on_retry), (signals.task_revoked, on_revoked),
                             (signals.task_postrun, on_postrun), (signals.task_prerun, broken_receiver)):
        signal.connect(receiver, weak=False)


@app.task
def add(x, y):
    return x + y


@batched(app, batch_size=16, max_delay=0.05)
def double(x):
    """Negative inputs fail alone, with an exception returned rather than raised."""
    return [ValueError(f"negative input {v}") if v < 0 else v * 2 for v in x]


class Flaky(Exception):
    pass


@batched(app, batch_size=8, max_delay=0.02, autoretry_for=(Flaky,), max_retries=2, default_retry_delay=0.2)
def flaky(x):
    """Each input fails on its first attempt only."""
    attempts = [R.hincrby("signalled:flaky", str(v), 1) for v in x]
    return [Flaky(f"attempt {n} of {v}") if n < 2 else f"ok:{v}" for v, n in zip(x, attempts, strict=True)]


class ModelError(Exception):
    pass


@batched(app, batch_size=8, max_delay=0.05, isolate_errors=False)
def crash(x):
    raise ModelError(f"model crashed on a batch of {len(x)}")


@batched(app, batch_size=8, max_delay=0.2, track_started=True)
def gated(x):
    """Holds its batch until the test opens the gate, so the test can see STARTED."""
    R.blpop(["signalled:gate"], timeout=30)
    return x
