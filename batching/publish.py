"""One task message, built exactly as ``.delay()`` builds it, and pushed — plainly, or through admission control.

``.delay()`` goes through Celery's ``send_task`` (``amqp.as_task_v2``, the ``before_task_publish`` signal), kombu's
``Producer.publish`` (serializer, compression, ``delivery_mode``, ``expiration``, ``prepare_message``) and the Redis
channel's ``basic_publish`` (base64 body, ``delivery_info``, ``delivery_tag``, the list of the message's priority),
ending in one LPUSH. ``submit_many`` and ``batching.aio.submit`` cannot take that path — the first pushes thousands
in one round trip, the second must not block an event loop on a socket — so ``build`` repeats it step by step with
the same Celery and kombu calls, and hands the final routing to kombu itself: ``basic_publish`` is given a stand-in
for kombu's publish batch that records the LPUSH instead of sending it. What comes out is the exact list key and
list element ``.delay()`` would have written; a test compares the two field by field.

``Admission`` pushes such elements with ``lua/admit.lua`` for a task with ``max_queue_size``: the depth check and
the pushes are one atomic call. In durable mode (``wait_replicas``) every push is followed, in the same round trip,
by Redis's ``WAIT`` (``store/replication.py``).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals
from kombu.compression import compress
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from .cost import COST_HEADER
from .errors import ConfigurationError, QueueFull
from .store.keys import QueueKeys
from .store.lua import source
from .store.replication import NO_WAIT, Replicas

#: Seconds a refused send is told to wait when the queue's drain rate is not known yet.
DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Message:
    """A task message ready to push: its id, the list kombu routes it to (without the transport's key prefix), the
    list element, and what the after-publish signal needs."""

    task_id: str
    queue: str
    key: str
    raw: bytes
    body: Any
    headers: dict[str, Any]
    sent_event: dict[str, Any] | None = None


class _Recorder:
    """Takes the place of kombu's Redis publish batch: kombu's ``_put`` hands it the final commands of a message."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


def route(channel: Any, envelope: dict[str, Any], queue: str) -> tuple[str, bytes]:
    """kombu's own routing of a prepared message to ``queue`` (anonymous exchange): the list key and the element."""
    if not hasattr(channel, "create_publish_batch"):
        raise ConfigurationError("batching needs kombu >= 5.7 (its Redis publish batch) to build messages in bulk")
    recorder = _Recorder()
    channel.basic_publish(envelope, exchange="", routing_key=queue, _publish_batch=recorder)
    # kombu adds PEXPIREs only for queues declared with x-expires; a batched queue is never declared with one.
    (key, raw), = (args for name, args in recorder.commands if name == "lpush")
    return key, raw


def build(
    task: Any,
    channel: Any,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    countdown: float | None = None,
    expires: float | None = None,
    priority: int | None = None,
    reply_to: str = "",
    origin: str | None = None,
    fast_repr: bool = False,
    sent_event: bool = False,
    add_headers: Callable[[dict[str, Any]], None] | None = None,
) -> Message:
    """One message of ``task`` with ``args``/``kwargs`` (already checked), as ``task.apply_async`` would send it.

    ``fast_repr`` replaces Celery's ``saferepr`` of the arguments (half the cost of a message) with a truncated
    ``repr``, for bulk sends. ``sent_event``: prepare the ``task-sent`` event (``Message.sent_event``).
    ``add_headers`` adds headers before anything reads them (Sentry's trace headers). ``before_task_publish`` is sent
    with the message's mutable headers, as Celery does; call ``published`` once the message is stored.
    """
    app = task.app
    amqp = app.amqp
    kwargs = dict(kwargs or {})
    task_id = uuid()
    # The task's own defaults, as apply_async merges them (Celery reads them with the same getter).
    defaults = task._get_exec_options()
    queue_name = queue_of(task, args, kwargs)
    if priority is None:
        priority = defaults.get("priority")
    if expires is None:
        expires = defaults.get("expires")
    repr_kwargs = {"argsrepr": repr(tuple(args))[: amqp.argsrepr_maxsize],
                   "kwargsrepr": repr(kwargs)[: amqp.kwargsrepr_maxsize]} if fast_repr else {}
    message = amqp.as_task_v2(
        task_id, task.name, args=tuple(args), kwargs=kwargs, countdown=countdown, expires=expires,
        ignore_result=bool(task.ignore_result), origin=origin, reply_to=reply_to,
        time_limit=defaults.get("time_limit"), soft_time_limit=defaults.get("soft_time_limit"),
        create_sent_event=sent_event, **repr_kwargs,
    )
    headers, properties, body = message.headers, message.properties, message.body
    batching = getattr(task, "batching", None)
    if batching is not None:
        # BatchedTask.apply_async adds them: when the request was sent, for queue-wait metrics and the oldest age;
        # its cost, for packing batches from the headers (CostError / CostTooLarge before anything is sent).
        headers["sent_at"] = time.time()
        if batching.cost is not None:
            headers[COST_HEADER] = batching.cost.of(kwargs)
    if add_headers is not None:
        add_headers(headers)
    signals.before_task_publish.send(
        sender=task.name, body=body, exchange="", routing_key=queue_name, declare=[], headers=headers,
        properties=properties, retry_policy=dict(app.conf.task_publish_retry_policy),
    )
    serializer = defaults.get("serializer") or app.conf.task_serializer
    content_type, content_encoding, data = dumps(body, serializer=serializer)
    compression = defaults.get("compression") or app.conf.task_compression
    if compression:
        data, headers["compression"] = compress(data, compression)
    # kombu's Producer.publish adds these: the exchange's delivery mode (Celery's default), and a per-message TTL
    # when the task expires.
    properties["delivery_mode"] = maybe_delivery_mode(
        defaults.get("delivery_mode") or app.conf.task_default_delivery_mode
    )
    if expires is not None:
        properties["expiration"] = str(int(max(expires, 0) * 1000))
    envelope = channel.prepare_message(data, priority or 0, content_type, content_encoding, headers, properties)
    key, raw = route(channel, envelope, queue_name)
    return Message(task_id, queue_name, key, raw, body, headers, message.sent_event)


def published(task: Any, message: Message) -> None:
    """Send ``after_task_publish`` for a stored message, as Celery does after its publish."""
    signals.after_task_publish.send(
        sender=task.name, body=message.body, headers=message.headers, exchange="", routing_key=message.queue,
    )


def queue_of(task: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> str:
    """The queue a message of ``task`` goes to: a batched task's own, or where Celery's router sends a plain one."""
    batching = getattr(task, "batching", None)
    if batching is not None:
        return str(batching.queue)
    options = {k: v for k, v in task._get_exec_options().items() if v is not None}
    queue = task.app.amqp.router.route(options, task.name, args, kwargs, task).get("queue")
    return str(getattr(queue, "name", queue) or task.app.conf.task_default_queue)


def tag(result: Any, task: Any) -> Any:
    """Remember a batched request's queue on its ``AsyncResult``, where ``batching.aio`` looks for it to mark the
    request abandoned (Celery's result knows only its id)."""
    batching = getattr(task, "batching", None)
    if batching is not None:
        result.batching_queue = batching.queue
    return result


def queue_keys(task: Any, channel: Any) -> QueueKeys:
    """The keys of a batched task's queue, under the transport's key prefix, separator and priority steps."""
    return QueueKeys(
        task.batching.queue, prefix=channel.global_keyprefix or "", sep=channel.sep,
        priority_steps=tuple(channel.priority_steps),
    )


class Admission:
    """Pushes messages to a bounded queue with ``admit.lua``: all of a send, or nothing and ``QueueFull``."""

    SCRIPT = "admit.lua"

    def __init__(self, keys: QueueKeys, limit: int) -> None:
        self.keys = keys
        self.limit = limit
        self.lists = keys.lists
        self._index = {key: i for i, key in enumerate(self.lists, start=1)}

    def arguments(self, messages: Sequence[Message]) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of one admission call for ``messages``."""
        args: list[Any] = [self.limit, time.time()]
        prefix = self.keys.prefix
        for m in messages:
            index = self._index.get(prefix + m.key)
            if index is None:
                raise ConfigurationError(
                    f"a message for {self.keys.queue!r} was routed to {m.key!r}, not to one of the queue's lists: "
                    "a bounded queue cannot be sent elsewhere"
                )
            args += [index, m.raw]
        return [self.keys.stats, *self.lists], args

    def check(self, reply: Sequence[Any], count: int) -> int:
        """The depth after an admitted send; raises ``QueueFull`` for a refused one."""
        if int(reply[0]):
            return int(reply[1])
        depth = int(reply[1])
        rate = float(reply[2]) if reply[2] not in (b"", "", None) else 0.0
        excess = depth + count - self.limit
        if count > self.limit:
            retry_after = math.inf  # can never fit
        elif rate > 0:
            retry_after = max(excess / rate, 0.001)
        else:
            retry_after = DEFAULT_RETRY_AFTER_S
        raise QueueFull(
            f"queue {self.keys.queue!r} is full: {depth} request(s) waiting, max_queue_size={self.limit}, "
            f"{count} more refused; retry in {retry_after:.3g}s",
            depth=depth, retry_after=retry_after, limit=self.limit,
        )

    def push(self, client: Any, messages: Sequence[Message], replicas: Replicas = NO_WAIT) -> int:
        """Push ``messages`` (one atomic call) with a sync redis-py ``client``; returns the depth after. With
        ``replicas``, the call is confirmed by them (``NotReplicated`` otherwise) in the same round trip."""
        keys, args = self.arguments(messages)
        script = _script(client)
        if not replicas:
            return self.check(script(keys=keys, args=args), len(messages))
        (reply,) = replicas.run(client, lambda pipe: script(keys=keys, args=args, client=pipe), _what(messages))
        return self.check(reply, len(messages))


_scripts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _script(client: Any) -> Any:
    """``admit.lua`` registered once per client (redis-py sends EVALSHA and loads it again on NOSCRIPT)."""
    found = _scripts.get(client)
    if found is None:
        found = _scripts[client] = client.register_script(source(Admission.SCRIPT))
    return found


def send_pushed(task: Any, send: Any, producer: Any = None) -> Any:
    """Run ``send(producer)`` — Celery's own ``apply_async`` — with its final push made here instead of by kombu:
    through ``admit.lua`` for a bounded queue (``max_queue_size``), and confirmed by replicas (``wait_replicas``).

    Everything before the push is Celery's and kombu's: routing, headers, signals, serialization, declaring. The
    producer hands its prepared message to a publish batch when one is active (kombu's ``Producer.batch``); this
    installs one that routes the message with kombu and pushes it. A refused send raises ``QueueFull`` out of
    ``apply_async`` before ``after_task_publish``, and drops the result subscription Celery opened for it; an
    unconfirmed one raises ``NotReplicated`` (the message is on the master: it may still run).
    """
    with task.app.producer_or_acquire(producer) as p:
        local = p._batch_local
        outer = getattr(local, "current", None)
        local.current = _PushOne(task)
        try:
            return send(p)
        finally:
            if outer is None:
                del local.current
            else:
                local.current = outer


class _PushOne:
    """Quacks like kombu's producer batch state for exactly one message: pushes it our way instead of buffering it."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def publish(self, channel: Any, envelope: dict[str, Any], **kwargs: Any) -> None:
        recorder = _Recorder()
        channel.basic_publish(envelope, _publish_batch=recorder, **kwargs)
        (key, raw), = (args for name, args in recorder.commands if name == "lpush")
        task_id = envelope["properties"].get("correlation_id", "")
        settings = self.task.batching
        message = Message(task_id, settings.queue, key, raw, None, {})
        client = sync_client(channel.pool)
        if settings.max_queue_size is None:
            push_plain(client, channel.global_keyprefix or "", [message], replicas_of(self.task))
            return
        admission = Admission(queue_keys(self.task, channel), settings.max_queue_size)
        try:
            admission.push(client, [message], replicas_of(self.task))
        except QueueFull:
            consumer = getattr(self.task.backend, "result_consumer", None)
            if consumer is not None and hasattr(consumer, "cancel_for"):
                consumer.cancel_for(task_id)  # Celery subscribed to the result of a task that now never exists
            raise


def replicas_of(task: Any) -> Replicas:
    """How many replicas must acknowledge a push of ``task`` (durable mode: its ``wait_replicas``)."""
    settings = task.batching
    return Replicas(settings.wait_replicas, settings.wait_timeout)


def push_plain(client: Any, prefix: str, messages: Sequence[Message], replicas: Replicas = NO_WAIT) -> None:
    """LPUSH ``messages`` in one round trip (kombu's own final command), confirmed by ``replicas`` if any."""
    def queue_pushes(pipe: Any) -> None:
        for m in messages:
            pipe.lpush(prefix + m.key, m.raw)

    replicas.run(client, queue_pushes, _what(messages))


def _what(messages: Sequence[Message]) -> str:
    return f"task {messages[0].task_id}" if len(messages) == 1 else f"a send of {len(messages)} tasks"


_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def sync_client(pool: Any) -> Any:
    """A plain redis-py client on kombu's connection pool (kombu's own client would prefix only the first key)."""
    found = _clients.get(pool)
    if found is None:
        found = _clients[pool] = redis.Redis(connection_pool=pool)
    return found
