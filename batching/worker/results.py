"""Store a batch's outcomes in Celery's result backend, in exactly the format a normal worker writes.

Metas are built by the backend's own helpers (``encode_result`` to serialize exceptions the way clients re-raise
them, ``_get_result_meta``'s fields, ``encode``, ``get_key_for_task``). On a Redis backend all of a batch's results
go out in one round trip (``lua/results.lua``) as ``SET key meta EX ttl`` + ``PUBLISH key meta`` per task: the SET
serves later ``get()`` and ``.state`` calls, the PUBLISH wakes clients already blocked in ``get()``. Celery's own
``store_result`` would spend two round trips per task (a GET to de-duplicate, then the write); the claim already
guarantees that a message is processed by one consumer at a time, so that GET buys nothing here.

The common meta, a success with no children, group or parent under kombu's JSON, is written from a template
around the encoded result: the same bytes, without a dict and a new encoder per task. Array results (numpy,
torch) are encoded in C (``arrays``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import states
from celery.backends.base import Backend
from celery.backends.redis import RedisBackend
from celery.result import ResultBase
from kombu import serialization
from kombu.utils import json as kombu_json

from ..errors import ResultEncodeError
from ..store.lua import script
from ..store.queue import dead_link_options
from ..store.replication import NO_WAIT, Replicas
from .arrays import json_fragment, plain
from .batch import Batch, Outcome
from .request import TaskRequest

logger = logging.getLogger(__name__)

#: Result types that are neither arrays nor results of other tasks.
_SCALARS = frozenset({int, float, str, bool, type(None)})


class ResultWriter:
    """Writes outcomes to one app's result backend."""

    def __init__(
        self, backend: Backend, *, socket_timeout_s: float | None = None, replicas: Replicas = NO_WAIT
    ) -> None:
        self.backend = backend
        #: Durable mode: a Redis backend's writes count once this many replicas acknowledged them.
        self.replicas = replicas
        self._pipelined = isinstance(backend, RedisBackend)
        self.client: Any = self._client(socket_timeout_s) if self._pipelined else None
        # With result_extended the meta also carries name/args/kwargs/worker/...: let Celery build all of it.
        self._extended = bool(backend.app.conf.find_value_for_key("extended", "result"))
        self._pickled = backend.serializer == "pickle"
        #: A success meta with nothing but the task's own fields is written from a template (``_success_json``)
        #: when the serializer is kombu's own JSON, uncompressed: the same bytes for a fraction of the cost.
        self._templated = (
            backend.serializer == "json" and not backend.compression and not self._extended
            and serialization.registry._encoders.get("json", (None, None, None))[2] is kombu_json.dumps
        )
        # kombu's dumps() builds an encoder per call; one reused instance writes the same text.
        self._json = kombu_json.JSONEncoder()
        self._script: Any = None
        self._key_prefix: bytes | None = None
        self._started_script: Any = None

    def write_started(self, requests: Sequence[TaskRequest], hostname: str, pid: int) -> None:
        """STARTED for every request (``track_started``), as Celery's tracer stores it before running a task.

        On Redis, one round trip for the batch that never overwrites a final state (``lua/started.lua``); other
        backends store it per task through their own ``store_result``, as Celery's tracer does.
        """
        requests = [r for r in requests if not r.ignore_result]
        if not requests:
            return
        info = {"pid": pid, "hostname": hostname}
        if not self._pipelined:
            for r in requests:
                self.backend.store_result(r.id, info, states.STARTED, request=r)
            return
        backend: Any = self.backend
        keys = [backend.get_key_for_task(r.id) for r in requests]
        metas = [self._meta(Outcome(r.id, states.STARTED, info, r), None) for r in requests]
        if self._started_script is None:
            self._started_script = script(self.client, "started.lua")
        readable = "json" if backend.serializer == "json" else "opaque"
        self._started_script(keys=keys, args=[readable, int(backend.expires or 0), *metas])

    def fences_on(self, broker: Any) -> bool:
        """True if results go to the same Redis database as ``broker``'s claims: then ``write`` can check the claim
        in the same script that stores (with another backend the keeper checks just before writing)."""
        if not self._pipelined:
            return False
        return _server_of(self.client.connection_pool) == _server_of(broker.connection_pool)

    def write(self, outcomes: Sequence[Outcome], fence: tuple[str, str] | None = None) -> bool:
        """Store the outcomes; with ``fence`` (claims key, claim id) only while that claim is registered.

        Returns False, having written nothing, when fenced off.
        """
        outcomes = [o for o in outcomes if not (o.request is not None and o.request.ignore_result)]
        if not outcomes:
            return True
        if not self._pipelined:
            for o in outcomes:  # other backends: their own store path, one call per task
                self.backend.store_result(o.task_id, o.value, o.state, traceback=o.traceback, request=o.request)
            return True
        backend: Any = self.backend
        date_done = backend.app.now().isoformat()  # one clock read per batch: they finished together
        expires = int(backend.expires or 0)
        failure_expires = getattr(backend, "failure_expires", None)
        if failure_expires is not None:
            # Two lifetimes: the script takes the tasks with the usual one first, then the failures.
            outcomes = sorted(outcomes, key=lambda o: o.state == states.FAILURE)
        usual = sum(1 for o in outcomes if failure_expires is None or o.state != states.FAILURE)
        keys = [self._key(o.task_id) for o in outcomes]
        payloads = [self._encode(o, date_done) for o in outcomes]
        if self._script is None:
            self._script = script(self.client, "results.lua")
        args = [len(payloads), *payloads, usual, expires, int(failure_expires or 0)]
        if fence is not None:
            keys.append(fence[0])
            args.append(fence[1])
        if not self.replicas:
            return int(self._script(keys=keys, args=args)) >= 0
        results = self._script
        (stored,) = self.replicas.run(self.client, lambda pipe: results(keys=keys, args=args, client=pipe),
                                      f"the results of a batch of {len(payloads)}")
        return int(stored) >= 0

    def _key(self, task_id: str) -> Any:
        """``backend.get_key_for_task(task_id)``, by concatenation when the backend's keys are its prefix + the id
        (checked once): Celery's helper converts and joins three parts per call."""
        if self._key_prefix is None:
            backend: Any = self.backend
            prefix = backend.task_keyprefix
            probe = "probe-4f0c"
            self._key_prefix = prefix if backend.get_key_for_task(probe) == prefix + probe.encode() else b""
        if not self._key_prefix:
            return self.backend.get_key_for_task(task_id)
        return self._key_prefix + task_id.encode()

    def _client(self, socket_timeout_s: float | None) -> Any:
        """The backend's Redis client, or, given a timeout, one on the same server that notices a dead link within
        it (Celery's default ``redis_socket_timeout`` is 120 s: a keeper would hang that long in a partition)."""
        client: Any = self.backend.client
        pool = client.connection_pool
        if socket_timeout_s is None or type(pool) is not redis.ConnectionPool:  # Sentinel & co. keep their own
            return client
        kwargs = {**pool.connection_kwargs, **dead_link_options(socket_timeout_s)}
        return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))

    def _encode(self, o: Outcome, date_done: str) -> Any:
        backend: Any = self.backend
        try:
            if self._templated and o.state == states.SUCCESS:
                payload = self._success_json(o, date_done)
                if payload is not None:
                    return payload
            return self._meta(o, date_done)
        except Exception as exc:
            # A result the serializer cannot handle (a numpy scalar under json, say) fails that task alone, with a
            # message that says what to return instead; the rest of the batch is stored normally.
            error = ResultEncodeError(
                f"result of type {type(o.value).__name__} cannot be stored with the "
                f"{backend.serializer!r} result serializer ({exc}); return plain Python values"
            )
            return self._meta(Outcome.failure(o.task_id, error, o.request), date_done)

    def _meta(self, o: Outcome, date_done: str | None) -> Any:
        """The meta dict of ``Backend._get_result_meta`` (same keys, same order), serialized by the backend.

        Celery's helper reads the clock and looks up settings per task; here the clock is read once per batch,
        and the helper itself is used whenever ``result_extended`` asks for more than these fields.
        """
        backend: Any = self.backend
        result = backend.encode_result(o.value if self._pickled else plain(o.value), o.state)
        request = o.request
        if self._extended:
            meta = backend._get_result_meta(result=result, state=o.state, traceback=o.traceback, request=request)
        else:
            meta = {
                "status": o.state,
                "result": result,
                "traceback": o.traceback,
                "children": [child.as_tuple() for child in getattr(request, "children", None) or ()],
                "date_done": date_done,
            }
            if request is not None and request.group:
                meta["group_id"] = request.group
            if request is not None and request.parent_id:
                meta["parent_id"] = request.parent_id
        meta["task_id"] = o.task_id
        return backend.encode(meta)

    def _success_json(self, o: Outcome, date_done: str) -> str | None:
        """``_meta``'s JSON text for a plain success (no children, group or parent; the common case), written
        around the encoded result instead of building and encoding a dict per task; None for any other meta.

        The text is byte for byte what ``backend.encode(meta)`` writes (a test compares them). An array result is
        encoded in C (``arrays.json_fragment``).
        """
        request, value = o.request, o.value
        if request is not None and (request.children or request.group or request.parent_id):
            return None
        if type(value) in _SCALARS:  # most results: no array or ResultBase to look for
            result = self._json.encode(value)
        elif isinstance(value, ResultBase):  # stored as its id tuple by encode_result
            return None
        else:
            result = json_fragment(value) or self._json.encode(plain(value))
        return (f'{{"status": "SUCCESS", "result": {result}, "traceback": null, "children": [], '
                f'"date_done": "{date_done}", "task_id": {self._json.encode(o.task_id)}}}')


def _server_of(pool: Any) -> tuple[Any, ...]:
    """Which Redis database a connection pool talks to: a Sentinel pool by its master's service name (its
    connection kwargs name no host), any other by address."""
    kwargs = pool.connection_kwargs
    service = getattr(pool, "service_name", None)
    if service is not None:
        return ("sentinel", service, kwargs.get("db"))
    return tuple(kwargs.get(k) for k in ("host", "port", "path", "db"))


class Started:
    """STARTED for a batch's items before it runs (``track_started``): informational, so a Redis error is logged
    and the batch runs anyway."""

    def __init__(self, writer: ResultWriter, hostname: str) -> None:
        self.writer = writer
        self.hostname = hostname

    def mark(self, batch: Batch) -> None:
        try:
            self.writer.write_started([item.request for item in batch.items], self.hostname, os.getpid())
        except Exception as exc:
            logger.warning("batching: could not store STARTED for a batch of %d (%s); running it anyway",
                           len(batch.items), exc)
