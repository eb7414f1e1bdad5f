"""OpenTelemetry's batch span for a batched task (OTEP 0220's pattern for batch processing).

The instrumentation gives each item its ``run/<task>`` CONSUMER span, in its client's trace (``signals``). The
model call is shared by every item, so it gets a span of its own, ``run_batch/<task>``, with a link to each item's
span: a trace viewer goes from any item to the batch it ran in and its size, and spans the model itself creates
(a tokenizer, an HTTP call) nest under the batch. Made with the global tracer provider, and only when the items
have spans: an app that merely imports the OpenTelemetry API gets nothing. Imported only when
``opentelemetry.trace`` already is.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace


class BatchSpan:
    """The batch's span, current in the model thread while ``run_batch`` runs."""

    def __init__(self, task_name: str, size: int, links: list[trace.Link]) -> None:
        tracer = trace.get_tracer("batching")
        self.span = tracer.start_span(f"run_batch/{task_name}", links=links,
                                      attributes={"celery.task_name": task_name, "batching.batch_size": size})
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def end(self) -> None:
        otel_context.detach(self._token)
        self.span.end()


def start(task_name: str, item_contexts: Sequence[contextvars.Context]) -> BatchSpan | None:
    """The batch span, linked to the span each item's prerun left current in its context (None: no item has one)."""
    links = []
    for context in item_contexts:
        span_context = context.run(trace.get_current_span).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    return BatchSpan(task_name, len(item_contexts), links) if links else None
