"""Client-side bulk helpers: enqueue many requests in one round trip, and collect many results efficiently.

``task.delay()`` goes through Celery's full publishing path — routing, declaring, a retry policy, a result
subscription — for every single message, which caps one client at about a thousand calls a second. A web app that
has many items in hand (a page of products to score, a file of texts) can instead build every message with
Celery's own ``amqp.as_task_v2`` and kombu's serializer and channel (``publish.build``), and push them all in one
pipeline round trip per ``chunk`` messages. The messages are byte-for-byte what ``.delay()`` would have sent, so
the worker cannot tell the difference.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery.result import AsyncResult
from celery.utils.nodenames import anon_nodename

from .publish import Admission, build, published, push_plain, queue_keys, replicas_of, sync_client, tag

#: Messages per pipeline round trip when submitting in bulk.
SUBMIT_CHUNK = 1000
#: Task ids per SUBSCRIBE / MGET command when gathering results.
GATHER_CHUNK = 1000


def submit_many(
    task: Any,
    calls: Iterable[Mapping[str, Any] | Sequence[Any]],
    *,
    countdown: float | None = None,
    expires: float | None = None,
    priority: int | None = None,
    chunk: int = SUBMIT_CHUNK,
) -> list[AsyncResult]:
    """Enqueue one request per item of ``calls`` (a dict of keyword arguments, or a sequence of positional ones).

    Every call is bound and checked against the task's signature first, so a bad item raises ``TypeError`` before
    anything is sent. Returns the ``AsyncResult`` of each request, in order. With the task's ``max_queue_size``,
    the whole call is admitted or refused at once (``QueueFull``: nothing is stored), in one atomic script call.
    """
    spec = task.batching.spec
    bound = [
        spec.bind((), dict(call)) if isinstance(call, Mapping) else spec.bind(tuple(call), {}) for call in calls
    ]
    app = task.app
    origin = anon_nodename()
    limit = task.batching.max_queue_size
    # What apply_async gives observability tools: the publish signals per message (build sends them; OpenTelemetry
    # injects its trace headers in before_task_publish), task-sent events, Sentry's trace headers.
    sent_events = bool(app.conf.task_send_sent_event)
    with _sentry_trace(task.name) as trace_headers, app.connection_for_write() as connection:
        channel = connection.default_channel
        add_headers = (lambda headers: _add_sentry_headers(headers, trace_headers)) if trace_headers else None
        messages = [
            build(task, channel, (), kwargs, countdown=countdown, expires=expires, priority=priority, origin=origin,
                  fast_repr=True, sent_event=sent_events, add_headers=add_headers)
            for kwargs in bound
        ]
        client = sync_client(channel.pool)
        replicas = replicas_of(task)
        if limit is not None:
            # All or nothing: one script call for the whole send. It can hold at most max_queue_size messages
            # anyway, since a larger send could never be admitted.
            Admission(queue_keys(task, channel), limit).push(client, messages, replicas)
        else:
            prefix = channel.global_keyprefix or ""
            for start in range(0, len(messages), chunk):
                push_plain(client, prefix, messages[start:start + chunk], replicas)
        for m in messages:
            published(task, m)
        if sent_events:
            events = app.events.Dispatcher(connection, enabled=True, buffer_group=["task"])
            try:
                for m in messages:
                    events.send("task-sent", **(m.sent_event or {}), queue=m.queue, exchange="", routing_key=m.queue)
                events.flush()  # all task-sent events in one publish, after the messages they announce
            finally:
                events.close()
    return [tag(task.AsyncResult(m.task_id), task) for m in messages]


@contextlib.contextmanager
def _sentry_trace(task_name: str) -> Iterator[dict[str, str] | None]:
    """Sentry's trace headers for a bulk submit, inside a ``queue.submit.celery`` span, when sentry-sdk is
    initialised with ``CeleryIntegration`` (which patches ``apply_async``, a path ``submit_many`` does not take).
    Nothing is imported when the app never imported sentry_sdk itself."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    integration = None
    if sentry_sdk is not None:
        from sentry_sdk.integrations.celery import CeleryIntegration

        integration = sentry_sdk.get_client().get_integration(CeleryIntegration)
    if sentry_sdk is None or integration is None or not integration.propagate_traces:
        yield None
        return
    from sentry_sdk.consts import OP

    with sentry_sdk.start_span(op=OP.QUEUE_SUBMIT_CELERY, name=task_name, origin=CeleryIntegration.origin) as span:
        yield dict(sentry_sdk.get_isolation_scope().iter_trace_propagation_headers(span=span))


def _add_sentry_headers(headers: dict[str, Any], trace: dict[str, str]) -> None:
    """Where Sentry's ``apply_async`` patch puts them: top level, and the nested ``headers`` the worker reads."""
    extra = {**trace, "sentry-task-enqueued-time": time.time()}
    headers.update(extra)
    headers.setdefault("headers", {}).update(extra)


def gather(
    results: Sequence[AsyncResult],
    *,
    timeout: float | None = None,
    propagate: bool = True,
    on_ready: Callable[[int], None] | None = None,
) -> list[Any]:
    """Wait for many results at once; return their values in order.

    One SUBSCRIBE per ``GATHER_CHUNK`` pending tasks, then one MGET to catch what finished before the
    subscription, then the published results as they arrive — rather than a subscription and a poll per task.
    With ``propagate`` the first failure is raised (with its original type); otherwise exceptions are returned
    in place of values. ``on_ready(index)`` is called as each result arrives (a progress bar, say). Raises
    ``TimeoutError`` when ``timeout`` passes first.
    """
    if not results:
        return []
    app = results[0].app
    backend: Any = app.backend
    client = backend.client
    keys = {backend.get_key_for_task(r.id): i for i, r in enumerate(results)}
    metas: list[dict[str, Any] | None] = [None] * len(results)
    pending = dict(keys)
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        names = list(pending)
        for start in range(0, len(names), GATHER_CHUNK):
            pubsub.subscribe(*names[start:start + GATHER_CHUNK])
        for start in range(0, len(names), GATHER_CHUNK):
            chunk = names[start:start + GATHER_CHUNK]
            for key, raw in zip(chunk, client.mget(chunk), strict=True):
                _take(backend, pending, metas, key, raw, on_ready)
        while pending:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise TimeoutError(f"{len(pending)} of {len(results)} results still pending after {timeout}s")
            message = pubsub.get_message(timeout=min(wait, 1.0) if wait is not None else 1.0)
            if message and message["type"] == "message":
                _take(backend, pending, metas, message["channel"], message["data"], on_ready)
    finally:
        pubsub.close()
    for result in results:
        result._cache = None
    return values_of(backend, metas, propagate)


def values_of(backend: Any, metas: Sequence[dict[str, Any] | None], propagate: bool) -> list[Any]:
    """The values of final result metas, in order; a failure raises its exception with its original type (with
    ``propagate``) or stands in its place."""
    out = []
    for meta in metas:
        assert meta is not None
        if meta["status"] in ("FAILURE", "REVOKED"):
            error = backend.exception_to_python(meta["result"])
            if propagate:
                raise error
            out.append(error)
        else:
            out.append(meta["result"])
    return out


def _take(
    backend: Any, pending: dict[Any, int], metas: list[Any], key: Any, raw: Any, on_ready: Callable[[int], None] | None
) -> None:
    if raw is None or key not in pending:
        return
    meta = backend.decode_result(raw)
    if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
        index = pending.pop(key)
        metas[index] = meta
        if on_ready is not None:
            on_ready(index)
