"""A worker app instrumented with the real ``opentelemetry-instrumentation-celery``, its spans exported to Redis.

Instrumented in ``worker_init`` (the worker's main process, where batching consumers run) and in
``worker_process_init`` (pool processes, as OpenTelemetry's docs show), exactly as a user would. ``client()`` is the
other side: an instrumented process that publishes inside a span of its own and prints what the test must find.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("traced", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)
SPANS = "traced:spans"


class RedisSpanExporter(SpanExporter):
    """Finished spans as JSON in a Redis list, for a test in another process to read."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        R.rpush(SPANS, *[json.dumps(_describe(span)) for span in spans])
        return SpanExportResult.SUCCESS


def _describe(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name, "kind": span.kind.name, "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}", "parent": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}), "status": span.status.status_code.name,
        "exceptions": [e.attributes.get("exception.type") for e in span.events if e.name == "exception"
                       and e.attributes],
        "links": [f"{link.context.span_id:016x}" for link in span.links],
    }


def instrument(**_: Any) -> TracerProvider:
    """Once per process (the solo pool sends both signals): the global provider, and the instrumentation."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(RedisSpanExporter()))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)
    return provider


signals.worker_init.connect(instrument, weak=False)
signals.worker_process_init.connect(instrument, weak=False)


@batched(app, batch_size=16, max_delay=0.05)
def shout(text):
    with trace.get_tracer("model").start_as_current_span("model-call"):  # the model's own span, under the batch's
        return [ValueError(f"cannot shout {t!r}") if t == "bad" else t.upper() for t in text]


def client() -> None:
    """Publish with ``delay`` and ``submit_many`` inside a client span; print its trace id and the task ids."""
    provider = instrument()
    with provider.get_tracer("client").start_as_current_span("client-request") as span:
        ids = [shout.delay(text="hello").id, shout.delay(text="bad").id]
        ids += [r.id for r in shout.submit_many([{"text": "bulk"}])]
    json.dump({"trace_id": f"{span.get_span_context().trace_id:032x}", "ids": ids}, sys.stdout)
