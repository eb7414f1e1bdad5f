"""A worker app that reports to Sentry through the real ``sentry-sdk`` and ``CeleryIntegration``, with a transport
that records envelopes in Redis instead of sending them.

The transport holds envelopes until Sentry flushes it, as Sentry's HTTP transport holds them in its queue, and
Sentry's own flush at interpreter exit is off: what the test finds was flushed by the worker at shutdown.
``client()`` is the other side: a Sentry-instrumented process publishing inside a transaction.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import redis
import sentry_sdk
from celery import Celery, signals
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.transport import Transport

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("reported", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)
WORKER_KEY, CLIENT_KEY = "reported:worker", "reported:client"


class RecordingTransport(Transport):
    """Errors and transactions as JSON in a Redis list, written when Sentry flushes."""

    key = WORKER_KEY

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.pending: list[str] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            event = item.get_event() or item.get_transaction_event()
            if event is not None:
                self.pending.append(json.dumps({"type": item.type, "event": event}, default=str))

    def flush(self, timeout: float, callback: Any = None) -> None:
        pending, self.pending = self.pending, []  # each consumer flushes at shutdown: take each envelope once
        if pending:
            R.rpush(self.key, *pending)


class ClientTransport(RecordingTransport):
    key = CLIENT_KEY


def init(transport: type[Transport] = RecordingTransport) -> None:
    """Tracing on, unless ``REPORTED_ERRORS_ONLY=1`` (Sentry's default setup: errors only)."""
    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1", transport=transport, integrations=[CeleryIntegration()],
        disabled_integrations=[AtexitIntegration()],
        traces_sample_rate=None if os.environ.get("REPORTED_ERRORS_ONLY") == "1" else 1.0,
    )


@signals.celeryd_init.connect
def init_sentry(**_: Any) -> None:
    init()


@batched(app, batch_size=16, max_delay=0.05)
def judge(text):
    """Items fail alone, each with its own exception type."""
    errors = {"bad": ValueError("bad input"), "worse": KeyError("worse input")}
    return [errors.get(t, t.upper()) for t in text]


class ModelError(Exception):
    pass


@batched(app, batch_size=16, max_delay=0.05, isolate_errors=False)
def crash(x):
    raise ModelError(f"model crashed on a batch of {len(x)}")


def client() -> None:
    """Publish with ``delay`` and ``submit_many`` inside a transaction; print its trace id and the task ids."""
    init(ClientTransport)
    with sentry_sdk.start_transaction(name="client-request", op="http.server") as transaction:
        ids = [judge.delay(text="fine").id, judge.delay(text="bad").id, judge.delay(text="worse").id]
        ids += [r.id for r in judge.submit_many([{"text": "bulk"}])]
    sentry_sdk.flush()
    json.dump({"trace_id": transaction.trace_id, "ids": ids}, sys.stdout)
