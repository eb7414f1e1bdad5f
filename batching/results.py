"""Store a batch's outcomes in Celery's result backend, in exactly the format a normal worker writes.

Metas are built by the backend's own helpers (``encode_result`` to serialize exceptions the way clients re-raise
them, ``_get_result_meta``, ``encode``, ``get_key_for_task``). On a Redis backend all of a batch's results go out in
one pipeline round trip as ``SET key meta EX ttl`` + ``PUBLISH key meta`` per task: the SET serves later ``get()``
and ``.state`` calls, the PUBLISH wakes clients already blocked in ``get()``. Celery's own ``store_result`` would
spend two round trips per task (a GET to de-duplicate, then the write); the claim already guarantees that a
message is processed by one consumer at a time, so that GET buys nothing here.
"""

from __future__ import annotations

import logging
import traceback as tb
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.app.task import Context
from celery.backends.base import Backend
from celery.backends.redis import RedisBackend

from .errors import ResultEncodeError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """The final state of one task: ``value`` is the result, or the exception for FAILURE/REVOKED."""

    task_id: str
    state: str
    value: Any
    request: Context | None = None
    traceback: str | None = None

    @classmethod
    def of(cls, task_id: str, result: Any, request: Context | None = None) -> Outcome:
        """SUCCESS with ``result``, or FAILURE if ``result`` is an exception (the batch contract)."""
        if isinstance(result, Exception):
            return cls.failure(task_id, result, request)
        return cls(task_id, states.SUCCESS, result, request)

    @classmethod
    def failure(cls, task_id: str, exc: BaseException, request: Context | None = None) -> Outcome:
        trace = "".join(tb.format_exception(exc)) if exc.__traceback__ is not None else None
        return cls(task_id, states.FAILURE, exc, request, trace)


class ResultWriter:
    """Writes outcomes to one app's result backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._pipelined = isinstance(backend, RedisBackend)

    def write(self, outcomes: Sequence[Outcome]) -> None:
        outcomes = [o for o in outcomes if not (o.request is not None and o.request.ignore_result)]
        if not outcomes:
            return
        if not self._pipelined:
            for o in outcomes:  # other backends: their own store path, one call per task
                self.backend.store_result(o.task_id, o.value, o.state, traceback=o.traceback, request=o.request)
            return
        backend: Any = self.backend
        with backend.client.pipeline(transaction=False) as pipe:
            for o in outcomes:
                payload = self._encode(o)
                key = backend.get_key_for_task(o.task_id)
                ttl = backend.expires
                if o.state == states.FAILURE and getattr(backend, "failure_expires", None) is not None:
                    ttl = backend.failure_expires
                if ttl:
                    pipe.set(key, payload, ex=int(ttl))
                else:
                    pipe.set(key, payload)
                pipe.publish(key, payload)
            pipe.execute()

    def _encode(self, o: Outcome) -> Any:
        backend: Any = self.backend
        try:
            return self._meta(o)
        except Exception as exc:
            # A result the serializer cannot handle (a numpy scalar under json, say) fails that task alone, with a
            # message that says what to return instead; the rest of the batch is stored normally.
            error = ResultEncodeError(
                f"result of type {type(o.value).__name__} cannot be stored with the "
                f"{backend.serializer!r} result serializer ({exc}); return plain Python values"
            )
            return self._meta(Outcome.failure(o.task_id, error, o.request))

    def _meta(self, o: Outcome) -> Any:
        backend: Any = self.backend
        result = backend.encode_result(o.value, o.state)
        meta = backend._get_result_meta(result=result, state=o.state, traceback=o.traceback, request=o.request)
        meta["task_id"] = o.task_id
        return backend.encode(meta)
