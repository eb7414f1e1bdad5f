"""OpenTelemetry for the benchmark's worker (``BENCH_OTEL=1 python -m bench``): what instrumenting costs.

The real ``opentelemetry-instrumentation-celery`` with the SDK's ``BatchSpanProcessor``, as a deployment runs it;
only the export is left out (spans are dropped instead of sent), so the figure is the worker's own cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import signals


def instrument_worker() -> None:
    signals.worker_init.connect(_instrument, weak=False)
    signals.worker_process_init.connect(_instrument, weak=False)


def _instrument(**_: Any) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    CeleryInstrumentor().instrument(tracer_provider=provider)
