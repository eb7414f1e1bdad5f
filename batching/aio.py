"""asyncio-native sending and waiting, on ``redis.asyncio``: no thread per waiting request.

::

    result = await batching.aio.submit(predict, text="hello")       # the message .delay() sends; never blocks
    value = await batching.aio.wait(result, timeout=30)               # the value, or the task's own exception
    values = await batching.aio.gather(results, timeout=30)           # all of them, in order

Every waiter of an event loop shares one pub/sub connection (``listener.ResultListener``) and every sender one
command connection, per Redis; ``close()`` releases the running loop's. A waiter that times out or is cancelled
marks its request *abandoned* in Redis (unless ``abandon=False``): a batched request no consumer has claimed yet
then ends REVOKED with ``RequestAbandoned`` and never reaches the model; one already running is stored as usual.
Works with any task whose result backend is Redis, batched or plain (abandonment applies to batched tasks only).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from celery.result import AsyncResult

from .client import values_of
from .errors import BrokerError, QueueFull, ResultBackendError
from .listener import RECONNECT_ERRORS, ResultListener
from .publish import Admission, Message, build, published, queue_keys, replicas_of, tag
from .store.keys import QueueKeys
from .store.lua import source
from .store.replication import NO_WAIT, Replicas

__all__ = ["QueueFull", "close", "gather", "submit", "wait"]

#: Seconds an abandonment is remembered: a request still queued longer than this after its caller gave up runs.
ABANDONED_TTL_S = 600
#: Most abandonments remembered per queue (the oldest are dropped first).
ABANDONED_MAX = 100_000

#: Connections per loop to the broker (sends share pipelines, abandonments take one each).
BROKER_CONNECTIONS = 8



async def submit(task: Any, *args: Any, **kwargs: Any) -> AsyncResult:
    """Send one request of ``task`` without blocking the loop; returns its ``AsyncResult``.

    The message is the one ``task.delay(*args, **kwargs)`` sends (same headers and signals); arguments are bound
    and checked first (``TypeError``). With the task's ``max_queue_size``, raises ``QueueFull`` and stores nothing
    when the queue is full; with its ``wait_replicas``, returns once that many replicas hold the message
    (``NotReplicated`` otherwise).
    """
    batching = getattr(task, "batching", None)
    if batching is not None:
        args, kwargs = (), batching.spec.bind(tuple(args), dict(kwargs))
    elif task.typing:
        task.__header__(*args, **kwargs)  # Celery's own argument check, as apply_async does
    broker = await _broker(task.app)
    message = build(task, broker.channel, args, kwargs, reply_to=task.app.thread_oid)
    limit = batching.max_queue_size if batching is not None else None
    replicas = replicas_of(task) if batching is not None else NO_WAIT
    if limit is None:
        await broker.push(message, replicas)
    else:
        await broker.admit(task, message, limit, replicas)
    published(task, message)
    return tag(task.AsyncResult(message.task_id), task)


async def wait(result: AsyncResult, timeout: float | None = None, propagate: bool = True, *,
               abandon: bool = True) -> Any:
    """The value of ``result`` once the task finishes; with ``propagate``, its exception, with its own type.

    Raises ``TimeoutError`` after ``timeout`` seconds. On timeout or cancellation the request is marked abandoned
    (see the module's docstring) unless ``abandon`` is False.
    """
    (value,) = await gather([result], timeout=timeout, propagate=propagate, abandon=abandon)
    return value


async def gather(results: Sequence[AsyncResult], timeout: float | None = None, propagate: bool = True, *,
                 abandon: bool = True) -> list[Any]:
    """The values of ``results``, in order, once all are ready; see ``wait``.

    With ``propagate`` the first failure in order is raised; otherwise exceptions take their results' places.
    """
    if not results:
        return []
    backend = _redis_backend(results[0])
    listener = _state().listener(results[0].app, backend)
    keys = [backend.get_key_for_task(r.id) for r in results]
    futures = [listener.add(key) for key in keys]
    try:
        # asyncio.wait neither cancels the futures on timeout nor when this coroutine is cancelled: what is still
        # pending afterwards is exactly what was not ready.
        _, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(results)} result(s) not ready after {timeout}s")
        metas = [f.result() for f in futures]
    except (TimeoutError, asyncio.CancelledError):
        unfinished = [r for r, f in zip(results, futures, strict=True) if not f.done()]
        if abandon and unfinished:
            await asyncio.shield(_abandon(unfinished))
        raise
    finally:
        for key, future in zip(keys, futures, strict=True):
            listener.discard(key, future)
    return values_of(backend, metas, propagate)


async def close() -> None:
    """Close the running loop's connections (a web app's shutdown); the next call opens new ones."""
    state = _states.pop(asyncio.get_running_loop(), None)
    if state is not None:
        await state.aclose()


# -- per-loop connections ------------------------------------------------------------------------------------


@dataclass
class _Broker:
    """The running loop's command connection to an app's broker, and a kombu channel to build messages with.

    Concurrent sends share pipelines: while one round trip is in flight the next sends queue up, and go together
    in the next one — a thousand requests arriving at once cost a handful of round trips and connections, not a
    thousand. Each message is still pushed (or admitted) on its own.
    """

    client: redis.asyncio.Redis
    channel: Any
    prefix: str
    script: Any = None
    _queued: list[tuple[Any, asyncio.Future[Any], Replicas]] = field(default_factory=list)
    _flusher: asyncio.Task[None] | None = None

    async def push(self, message: Message, replicas: Replicas) -> None:
        key = self.prefix + message.key
        await self._send(lambda pipe: pipe.lpush(key, message.raw), replicas, f"task {message.task_id}")

    async def admit(self, task: Any, message: Message, limit: int, replicas: Replicas) -> None:
        admission = Admission(queue_keys(task, self.channel), limit)
        keys, args = admission.arguments([message])
        if self.script is None:
            self.script = self.client.register_script(source(Admission.SCRIPT))
        script = self.script
        reply = await self._send(lambda pipe: script(keys=keys, args=args, client=pipe), replicas,
                                 f"task {message.task_id}")
        admission.check(reply, 1)

    async def _send(self, queue_on: Any, replicas: Replicas = NO_WAIT, what: str = "") -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((queue_on, future, replicas))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        reply, acked = await future
        if replicas:
            replicas.check(acked, what)
        return reply

    async def _flush(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                # Durable sends in this round trip: one WAIT after all of its writes confirms them all.
                waits = [r for _, _, r in batch if r]
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for queue_on, _, _ in batch:
                            await queue_on(pipe)
                        if waits:
                            max(waits, key=lambda r: (r.wanted, r.timeout_s)).queue_wait(pipe)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                acked = replies.pop() if waits else 0
                if isinstance(acked, Exception):
                    acked = 0  # WAIT refused (a replica-less setup that forbids it): nothing confirmed
                for (_, future, _), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result((reply, acked))
        finally:
            self._flusher = None


@dataclass
class _LoopState:
    brokers: dict[int, asyncio.Future[_Broker]] = field(default_factory=dict)
    listeners: dict[int, ResultListener] = field(default_factory=dict)

    def listener(self, app: Any, backend: Any) -> ResultListener:
        found = self.listeners.get(id(app))
        if found is None:
            pool = _async_pool(backend.connparams, f"result backend {backend.url!r}")
            client = redis.asyncio.Redis.from_pool(pool)  # owns the pool: aclose() closes it
            found = self.listeners[id(app)] = ResultListener(client, backend.decode_result)
        return found

    async def aclose(self) -> None:
        for listener in self.listeners.values():
            await listener.aclose()
        for opening in self.brokers.values():
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                await opening.result().client.aclose()
            else:
                opening.cancel()


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()


def _state() -> _LoopState:
    loop = asyncio.get_running_loop()
    state = _states.get(loop)
    if state is None:
        state = _states[loop] = _LoopState()
    return state


async def _broker(app: Any) -> _Broker:
    state = _state()
    opening = state.brokers.get(id(app))
    if opening is None:  # the first sender of this loop opens it; the others await the same future
        opening = state.brokers[id(app)] = asyncio.ensure_future(_open_broker(app))
    try:
        return await asyncio.shield(opening)
    except BaseException:
        if opening.done() and (opening.cancelled() or opening.exception() is not None):
            state.brokers.pop(id(app), None)  # try again next time
        raise


async def _open_broker(app: Any) -> _Broker:
    channel = await asyncio.to_thread(_channel, app)  # kombu connects (and pings) synchronously: once
    # A few connections, waited for when all are busy: concurrent sends share their pipelines anyway. The client
    # owns the pool (from_pool): aclose() closes it.
    pool = _async_pool(dict(channel.pool.connection_kwargs), f"broker {channel.connection.client.as_uri()}",
                       BROKER_CONNECTIONS)
    return _Broker(redis.asyncio.Redis.from_pool(pool), channel, channel.global_keyprefix or "")


_channels: dict[int, Any] = {}
_channels_lock = threading.Lock()


def _channel(app: Any) -> Any:
    """One kombu Redis channel per app and process, used only to build messages (no I/O after it is opened)."""
    with _channels_lock:
        found = _channels.get(id(app))
        if found is None:
            connection = app.connection_for_write()
            if connection.transport.driver_type != "redis":
                raise BrokerError(f"batching.aio needs a Redis broker; this app's broker is "
                                  f"{connection.transport.driver_type!r} ({connection.as_uri()})")
            found = _channels[id(app)] = connection.default_channel
        return found


#: redis-py connection settings that mean the same to ``redis.asyncio``'s connections.
_ASYNC_PARAMS = ("host", "port", "db", "username", "password", "socket_timeout", "socket_connect_timeout",
                 "socket_keepalive", "socket_keepalive_options", "health_check_interval", "client_name",
                 "credential_provider", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs",
                 "ssl_check_hostname")


def _async_pool(params: dict[str, Any], what: str, max_connections: int | None = None) -> Any:
    """A ``redis.asyncio`` pool with the sync redis-py connection settings Celery and kombu build; with
    ``max_connections``, callers wait for a free connection instead of failing."""
    cls = params.get("connection_class")
    out: dict[str, Any] = {k: v for k, v in params.items() if k in _ASYNC_PARAMS and v is not None}
    if cls is not None and issubclass(cls, redis.UnixDomainSocketConnection):
        out = {k: v for k, v in out.items() if k not in ("host", "port")}
        out.update(connection_class=redis.asyncio.UnixDomainSocketConnection, path=params["path"])
    elif cls is not None and issubclass(cls, redis.SSLConnection):
        out["connection_class"] = redis.asyncio.SSLConnection
    elif cls is not None and cls is not redis.Connection:
        raise ResultBackendError(f"batching.aio cannot open {what}: connection class {cls.__name__} is not supported")
    if max_connections is None:
        return redis.asyncio.ConnectionPool(**out)
    return redis.asyncio.BlockingConnectionPool(max_connections=max_connections, timeout=None, **out)


def _redis_backend(result: AsyncResult) -> Any:
    from celery.backends.redis import RedisBackend, SentinelBackend

    backend = result.backend
    if not isinstance(backend, RedisBackend) or isinstance(backend, SentinelBackend):
        raise ResultBackendError(
            f"batching.aio waits on a Redis result backend; this app's result backend is "
            f"{type(backend).__module__}.{type(backend).__name__} ({result.app.conf.result_backend!r})"
        )
    return backend


async def _abandon(results: Sequence[AsyncResult]) -> None:
    """Mark batched requests abandoned: their consumers settle them REVOKED unless already claimed."""
    by_queue: dict[str, list[str]] = {}
    app = results[0].app
    for r in results:
        queue = getattr(r, "batching_queue", None)  # set when it was sent; not on a result rebuilt from its id
        if queue is not None:
            by_queue.setdefault(queue, []).append(r.id)
    if not by_queue:
        return
    broker = await _broker(app)
    now = time.time()
    try:
        async with broker.client.pipeline(transaction=False) as pipe:
            for queue, ids in by_queue.items():
                key = QueueKeys(queue, prefix=broker.prefix).abandoned
                pipe.zadd(key, dict.fromkeys(ids, now))
                pipe.zremrangebyscore(key, "-inf", now - ABANDONED_TTL_S)
                pipe.zremrangebyrank(key, 0, -ABANDONED_MAX - 1)
                pipe.expire(key, ABANDONED_TTL_S)
            await pipe.execute()
    except RECONNECT_ERRORS:
        pass  # Redis is unreachable: the request simply runs, as it would have without abandonment
