"""Sentry for batched tasks: what sentry-sdk's ``CeleryIntegration`` gives a plain task, per item of a batch.

The integration hooks in by patching Celery's ``build_tracer`` (an isolation scope, a ``queue.task.celery``
transaction continuing the client's ``sentry-trace``/``baggage`` headers, a ``queue.process`` span around the task
body, an error event for an exception) and flushes only in pool processes. Batched tasks never pass through the
tracer, so the keeper does the same per item once the batch's results are stored, with the batch's real start
time, and flushes at worker shutdown. Imported only when ``sentry_sdk`` already is (``signals._sentry``).

One exception instance is reported once: when ``run_batch`` raised and every item of the batch failed with that
same error, Sentry's own de-duplication keeps the first event; items that failed with their own exceptions (the
returned ones, or those isolated by bisection) each get theirs. Events are built by the integration's own helpers
(``_make_event_processor``, ``_capture_exception``): the same tags, extras, fingerprints and mechanism.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import sentry_sdk
from celery import states
from sentry_sdk.consts import OP, SPANDATA, SPANSTATUS
from sentry_sdk.integrations.celery import CeleryIntegration, _capture_exception, _make_event_processor
from sentry_sdk.tracing import TransactionSource
from sentry_sdk.tracing_utils import has_tracing_enabled
from sentry_sdk.utils import capture_internal_exceptions

from .batch import Batch, Item


def active() -> bool:
    """True if Sentry is initialised with ``CeleryIntegration`` (as ``CeleryIntegration``'s own hooks check)."""
    return sentry_sdk.get_client().get_integration(CeleryIntegration) is not None


def report(task: Any, batch: Batch) -> None:
    """A transaction per item that ran (with its error event if it failed), after the batch was stored."""
    finished = time.time()
    started = batch.started_at or finished
    # Errors only (no traces_sample_rate/traces_sampler): nothing to do for the items that succeeded.
    tracing = has_tracing_enabled(sentry_sdk.get_client().options)
    for item in batch.items:
        if tracing or (item.outcome is not None and item.outcome.state == states.FAILURE):
            with capture_internal_exceptions():
                _report_item(task, item, started, finished)


def _report_item(task: Any, item: Item, started: float, finished: float) -> None:
    request, outcome = item.request, item.outcome
    if outcome is None:
        return
    with sentry_sdk.isolation_scope() as scope:
        scope._name = "celery"
        scope.clear_breadcrumbs()
        scope.add_event_processor(_make_event_processor(task, request.id, request.args, request.kwargs))
        transaction = sentry_sdk.continue_trace(
            request.headers or {}, op=OP.QUEUE_TASK_CELERY, name=task.name, source=TransactionSource.TASK,
            origin=CeleryIntegration.origin,
        )
        transaction.set_status(SPANSTATUS.OK)
        transaction.start_timestamp = datetime.fromtimestamp(started, UTC)
        sampling = {"celery_job": {"task": task.name, "args": list(request.args), "kwargs": request.kwargs}}
        with sentry_sdk.start_transaction(transaction, custom_sampling_context=sampling):
            span = sentry_sdk.start_span(op=OP.QUEUE_PROCESS, name=task.name, origin=CeleryIntegration.origin,
                                         start_timestamp=started)
            with span:
                span.set_data(SPANDATA.MESSAGING_MESSAGE_ID, request.id)
                span.set_data(SPANDATA.MESSAGING_MESSAGE_RETRY_COUNT, request.retries)
                span.set_data(SPANDATA.MESSAGING_DESTINATION_NAME, request.delivery_info["routing_key"])
                span.set_data(SPANDATA.MESSAGING_SYSTEM, "redis")
                enqueued = (request.headers or {}).get("sentry-task-enqueued-time")
                if isinstance(enqueued, (int, float)):
                    span.set_data(SPANDATA.MESSAGING_MESSAGE_RECEIVE_LATENCY, (started - enqueued) * 1000)
                if outcome.state == states.FAILURE and isinstance(outcome.value, BaseException):
                    exc = outcome.value  # the span fails; the event carries mechanism "celery"; `throws` are skipped
                    _capture_exception(task, (type(exc), exc, exc.__traceback__))
                span.finish(end_timestamp=finished)


def flush() -> None:
    sentry_sdk.flush()
