"""Celery's worker-side task signals for batched tasks: per item, in the order Celery's tracer sends them.

For a plain task, ``celery/app/trace.py`` sends ``task_prerun``, runs the task, stores its result, then sends
``task_success`` / ``task_failure`` / ``task_retry`` and ``task_postrun``, with ``task.request`` pushed to that task's
request throughout; the worker's strategy sends ``task_received`` when the message arrives, and ``task_revoked``
for a message found revoked or expired. A batch does the same for each of its items:

- fetch thread: ``task_received`` as items are claimed (``received``);
- model thread: ``task_prerun`` for every item, just before ``run_batch`` (``prerun``);
- keeper thread, once the batch's results are stored: ``task_success`` / ``task_failure`` (the item's own exception,
  with a billiard ``ExceptionInfo`` like the tracer's) / ``task_retry`` / ``task_revoked``, then ``task_postrun``
  (``settled``). Items settled REVOKED without running get ``task_revoked`` alone, as in Celery.

Each item's signals run in a ``contextvars.Context`` of its own, kept from its prerun to its postrun across the
two threads: OpenTelemetry attaches the item's span in prerun and detaches it in postrun, which only works in the
same context, and an item without trace headers must not become a child of its neighbour's span.

The same hooks drive the optional adapters: OpenTelemetry's batch span around ``run_batch`` (``otel``) and
Sentry's transactions and events after the batch is stored (``sentry``), each imported only when its package is.

A receiver that raises is logged by Celery's ``Signal.send`` and never fails the batch. With no receivers at all
and no Sentry, a batch costs a check of seven receiver lists and one ``sys.modules`` lookup, nothing per item.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import signals, states
from celery.exceptions import Retry

from .batch import Batch, Item, Outcome, format_traceback
from .request import TaskRequest

logger = logging.getLogger(__name__)

#: The signals sent around running an item (``task_received`` is checked on its own, in the fetch thread).
RUN_SIGNALS = (signals.task_prerun, signals.task_postrun, signals.task_success, signals.task_failure,
               signals.task_retry, signals.task_revoked)


def listened() -> bool:
    """True if any receiver is connected to a signal sent while running or settling an item."""
    return any(signal.receivers for signal in RUN_SIGNALS)


class TaskSignals:
    """Sends one batched task's signals; ``sender`` is what ``task_received`` names as its sender."""

    def __init__(self, app: Any, task_name: str, sender: Any = None) -> None:
        self.app = app
        self.task_name = task_name
        self.sender = sender

    @property
    def task(self) -> Any:
        """The task object (the signals' sender), looked up when first needed: the app is finalized by then."""
        return self.app.tasks[self.task_name]

    # -- fetch thread ------------------------------------------------------------------------------------------

    def received(self, items: Sequence[Item], start: int = 0) -> None:
        """``task_received`` for the items from ``start`` on: those just claimed that will run."""
        if len(items) <= start or not signals.task_received.receivers:
            return
        try:
            task = self.task
            for item in items[start:]:
                _guarded(task, item.request, signals.task_received.send, sender=self.sender, request=item.request)
        except Exception:  # never cost the fetch thread its claim
            logger.exception("batching %s: sending task_received failed", self.task_name)

    # -- model thread ------------------------------------------------------------------------------------------

    def prerun(self, batch: Batch) -> None:
        """``task_prerun`` for each item, each in the context that its postrun will use."""
        if not listened():
            return
        try:
            self._prerun(batch)
        except Exception:  # never cost the batch its run
            logger.exception("batching %s: sending task_prerun failed", self.task_name)

    def _prerun(self, batch: Batch) -> None:
        task = self.task
        contexts = []
        for item in batch.items:
            request = item.request
            context = contextvars.copy_context()
            context.run(_guarded, task, request, signals.task_prerun.send, sender=task, task_id=request.id,
                        task=task, args=request.args, kwargs=request.kwargs)
            contexts.append(context)
        batch.observed = _Observed(contexts, _batch_span(self.task_name, contexts))

    def ran(self, batch: Batch) -> None:
        """``run_batch`` returned (model thread): end the batch's span, if it has one."""
        observed: _Observed | None = batch.observed
        if observed is not None and observed.batch_span is not None:
            try:
                observed.batch_span.end()
            except Exception:
                logger.exception("batching %s: ending the batch span failed", self.task_name)

    # -- keeper thread -----------------------------------------------------------------------------------------

    def settled(
        self, batch: Batch, retries: Sequence[tuple[Outcome, float]], followers: Sequence[Outcome] = ()
    ) -> None:
        """After the batch's results are stored: Sentry's transactions and events, then each item's signals, then
        those of the requests answered by coalescing (``followers``)."""
        try:
            self._settled(batch, retries)
            if followers and listened():
                self._answered(batch, retries, followers)
        except Exception:  # the results are stored: nothing here may send the claim back to the queue
            logger.exception("batching %s: sending task signals after a batch failed", self.task_name)

    def _answered(self, batch: Batch, retries: Sequence[tuple[Outcome, float]], followers: Sequence[Outcome]) -> None:
        """A coalesced follower never ran itself: it gets its final signal and ``task_postrun`` (no prerun)."""
        task = self.task
        countdowns = {id(outcome): countdown for outcome, countdown in retries}
        runtime = time.time() - (batch.started_at or time.time())
        for outcome in followers:
            contextvars.copy_context().run(_finish, task, outcome, countdowns.get(id(outcome)), runtime)

    def _settled(self, batch: Batch, retries: Sequence[tuple[Outcome, float]]) -> None:
        sentry = _sentry()
        if sentry is not None and batch.items:
            sentry.report(self.task, batch)
        for outcome in batch.settled:
            if outcome.state == states.REVOKED and outcome.request is not None and signals.task_revoked.receivers:
                _revoked(self.task, outcome)
        observed: _Observed | None = batch.observed
        if observed is None:
            return
        task = self.task
        countdowns = {id(outcome): countdown for outcome, countdown in retries}
        runtime = time.time() - (batch.started_at or time.time())
        for item, context in zip(batch.items, observed.contexts, strict=True):
            if item.outcome is not None:
                context.run(_finish, task, item.outcome, countdowns.get(id(item.outcome)), runtime)

    def close(self) -> None:
        """Worker shutdown: send what Sentry still holds (it flushes by itself only in pool processes)."""
        sentry = _sentry()
        if sentry is not None:
            sentry.flush()


@dataclass(slots=True)
class _Observed:
    """A batch's state between its prerun and its settling: each item's context, the batch's OpenTelemetry span."""

    contexts: list[contextvars.Context]
    batch_span: Any = None


def _batch_span(task_name: str, contexts: list[contextvars.Context]) -> Any:
    """OpenTelemetry's batch span (``otel``) when the OpenTelemetry API is loaded; nothing is imported otherwise."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from . import otel

    return otel.start(task_name, contexts)


def _finish(task: Any, outcome: Outcome, countdown: float | None, runtime: float) -> None:
    """The item's final signal, then ``task_postrun`` with its state and return value, under one push of its
    request (as the tracer keeps one pushed from prerun to postrun)."""
    request, state, retval = outcome.request, outcome.state, outcome.value
    assert request is not None  # items always carry their request
    stack = task.request_stack
    stack.push(request)
    try:
        if state == states.SUCCESS:
            _send(task, request, signals.task_success.send, sender=task, result=retval, runtime=runtime)
        elif state == states.FAILURE:
            einfo = exception_info(retval, outcome.traceback)
            _send(task, request, signals.task_failure.send, sender=task, task_id=request.id, exception=retval,
                  args=request.args, kwargs=request.kwargs, traceback=retval.__traceback__, einfo=einfo)
        elif state == states.RETRY:
            retval = Retry(exc=outcome.value, when=countdown)
            _send(task, request, signals.task_retry.send, sender=task, request=request, reason=retval,
                  einfo=exception_info(retval, outcome.traceback))
        elif state == states.REVOKED:
            _send(task, request, signals.task_revoked.send, sender=task, request=request, terminated=False,
                  signum=None, expired="expired" in str(retval))
        _send(task, request, signals.task_postrun.send, sender=task, task_id=request.id, task=task,
              args=request.args, kwargs=request.kwargs, retval=retval, state=state)
    finally:
        stack.pop()


def _revoked(task: Any, outcome: Outcome) -> None:
    assert outcome.request is not None
    _guarded(task, outcome.request, signals.task_revoked.send, sender=task, request=outcome.request,
             terminated=False, signum=None, expired="expired" in str(outcome.value))


def _guarded(task: Any, request: TaskRequest, send: Callable[..., Any], /, **arguments: Any) -> None:
    """Send with ``task.request`` pushed to the item's request, as the tracer does."""
    stack = task.request_stack  # pushed as is, like the tracer does (push_request() would copy it into a Context)
    stack.push(request)
    try:
        _send(task, request, send, **arguments)
    finally:
        stack.pop()


def _send(task: Any, request: TaskRequest, send: Callable[..., Any], /, **arguments: Any) -> None:
    """``Signal.send`` already logs a receiver that raises; this also keeps anything else (building the einfo, a
    receiver's non-``Exception``-derived error is not caught) from costing the batch its results."""
    try:
        send(**arguments)
    except Exception:
        logger.exception("batching %s[%s]: sending a task signal failed", task.name, request.id)


class _UnraisedExceptionInfo(ExceptionInfo):
    """``ExceptionInfo`` for an exception that ``run_batch`` returned: it has no frames to walk."""

    def __init__(self, exc: BaseException, text: str) -> None:
        self.type = type(exc)
        self.tb = None
        self.traceback = text
        self.internal = False
        self.exception = ExceptionWithTraceback(exc, text)


def exception_info(exc: BaseException, text: str | None = None) -> ExceptionInfo:
    """The ``einfo`` Celery's tracer passes with ``task_failure`` / ``task_retry``, for a raised or returned error."""
    if exc.__traceback__ is not None:
        return ExceptionInfo((type(exc), exc, exc.__traceback__))
    return _UnraisedExceptionInfo(exc, text or format_traceback(exc))


def _sentry() -> Any:
    """The Sentry adapter when sentry-sdk is imported and initialised with ``CeleryIntegration``, else None.

    Nothing of Sentry is imported otherwise: an app that does not use it never loads it.
    """
    if "sentry_sdk" not in sys.modules:
        return None
    from . import sentry

    return sentry if sentry.active() else None
