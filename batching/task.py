"""``@batched``: a Celery task whose calls are single requests and whose worker side runs them in batches.

This is the client side: defining or calling a batched task imports nothing of the worker. The worker side is
registered by name (``WORKER_STEP``) and imported by ``celery worker`` alone, when it builds its blueprint.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from celery import Celery, Task
from celery._state import get_current_worker_task
from celery.result import AsyncResult
from celery.utils.time import rate
from kombu.exceptions import OperationalError

from . import routing, tuning
from .cost import COST_HEADER, CostSpec
from .errors import BrokerOutOfMemory, ConfigurationError, UnbatchedCallError
from .merge import CallSpec, execute
from .model import ModelHandle
from .policy import FlushPolicy
from .publish import send_pushed, tag
from .settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INSTANCES,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_WAIT_TIMEOUT_S,
    BatchSettings,
    RetryPolicy,
    check_task_options,
)

#: The worker bootstep, by dotted name: Celery resolves it when a worker starts, so clients never import it.
WORKER_STEP = "batching.worker.bootstep:BatchingStep"
#: ``Task.apply_async``'s positional parameters after ``args`` and ``kwargs``.
_APPLY_ASYNC_POSITIONAL = ("task_id", "producer", "link", "link_error", "shadow")

if "celery.bin.control" in sys.modules:
    # Under the ``celery`` command, which loads the app (and so this) before parsing ``control``'s arguments:
    # ``celery -A app control batching_set --task NAME ...`` must find the command and its option. Elsewhere (a
    # web app, a script) nothing of Celery's worker or CLI is imported for it.
    tuning.install()


class BatchedTask(Task):
    """A Celery task whose messages go to their own queue and are executed in batches by the batching consumer.

    Clients use it like any task (``delay``, ``apply_async``, ``s()``, ``send_task`` by name); arguments are
    checked against the per-request signature and bound to names at call time, so a bad call fails in the
    client with ``TypeError`` rather than later in the worker. Calling the task directly, or with
    ``apply()``/``task_always_eager``, runs a batch of one in-process.
    """

    #: Set by ``batched`` on each task class.
    batching: BatchSettings
    batching_model: ModelHandle
    typing = False  # our own binding below replaces Celery's check, and gives clearer messages
    #: A message of this task that reaches a normal queue is forwarded to the batch queue (worker side only).
    Strategy = "batching.worker.forward:forward"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery's task decorators build a subclass holding the function as ``run``: without ``@batched``'s
        # settings it could never be served, and the worker would fail on it at start, plain tasks included.
        if "run" in cls.__dict__ and "batching" not in cls.__dict__:
            raise ConfigurationError(
                f"task {cls.__dict__.get('name') or cls.__name__!r} uses base=BatchedTask without @batched: a "
                "batched task needs the settings @batched gives it. Define it with @batched(app, batch_size=..., "
                "max_delay=...) (or batching.shared_batched(...) without an app at hand) instead of "
                "@app.task(base=BatchedTask)"
            )

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> AsyncResult:
        bound = self.batching.spec.bind(tuple(args or ()), dict(kwargs or {}))
        # When it was sent, for queue-wait metrics and the age of the oldest message (Celery's headers lack it).
        options["headers"] = {"sent_at": time.time(), **(options.get("headers") or {})}
        if self.batching.cost is not None:
            # Computed here, in the client, so the consumer packs batches from the headers alone; a request that
            # could never fit raises CostTooLarge before anything is sent.
            options["headers"][COST_HEADER] = self.batching.cost.of(bound)
        try:
            settings = self.batching
            if (settings.max_queue_size is None and not settings.wait_replicas) or self.app.conf.task_always_eager:
                result = super().apply_async((), bound, *rest, **options)
            else:
                # A bounded queue or durable mode: Celery's own send, with the final push made by us (the admission
                # script; WAIT for the replicas).
                options.update(zip(_APPLY_ASYNC_POSITIONAL, rest, strict=False))
                producer = options.pop("producer", None)
                result = send_pushed(
                    self, lambda p: super(BatchedTask, self).apply_async((), bound, producer=p, **options), producer
                )
        except OperationalError as exc:
            if "maxmemory" not in str(exc):
                raise
            raise BrokerOutOfMemory(
                f"Redis is out of memory (used memory is over its maxmemory), so {self.name} was not queued; retry "
                f"later, or make room: {exc}"
            ) from exc
        return tag(result, self)

    def submit_many(self, calls: Iterable[Mapping[str, Any] | Sequence[Any]], **options: Any) -> list[AsyncResult]:
        """Enqueue many requests in one round trip per thousand; see ``batching.submit_many``."""
        from .client import submit_many

        return submit_many(self, calls, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        current = get_current_worker_task()
        if current is not None and not current.request.is_eager:
            # Inside a task a worker runs (celery.map/starmap/chunks call their task this way): this item would
            # run alone, in a pool process that would build its own model.
            raise UnbatchedCallError(
                f"{self.name} was called directly inside the task {current.name!r} a worker runs (task.map, "
                f"starmap and chunks do that): it would run one item at a time in a pool process. Send the "
                f"items to the batch queue instead: group({self.name.rpartition('.')[2]}.s(x) for x in xs)"
            )
        (outcome,) = execute(self.batching.spec, self.batching_model.run_batch(), [(args, kwargs)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def map(self, it: Any) -> Any:
        raise self._unbatched("map")

    def starmap(self, it: Any) -> Any:
        raise self._unbatched("starmap")

    def chunks(self, it: Any, n: int) -> Any:
        raise self._unbatched("chunks")

    def _unbatched(self, how: str) -> UnbatchedCallError:
        short = self.name.rpartition(".")[2]
        return UnbatchedCallError(
            f"{self.name}.{how}() would run every item one at a time inside one task in a pool process, unbatched. "
            f"Send the items to the batch queue instead: group({short}.s(x) for x in xs), or "
            f"{short}.submit_many(items) for many at once"
        )

    def worker_settings(self) -> BatchSettings:
        """The settings with the Celery options the consumer acts on, as this task resolves them (app defaults
        included): read when a worker starts, after the app is configured."""
        return dataclasses.replace(
            self.batching,
            ignore_result=bool(self.ignore_result),
            time_limit=self.time_limit,
            soft_time_limit=self.soft_time_limit,
            retry=RetryPolicy.from_task(self),
            track_started=bool(self.track_started),
        )


def batched(
    app: Celery,
    fn: Callable[..., Any] | None = None,
    *,
    model: Callable[[], Any] | None = None,
    name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_delay: float = DEFAULT_MAX_DELAY_S,
    queue: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    isolate_errors: bool = True,
    max_queue_size: int | None = None,
    wait_replicas: int = 0,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT_S,
    instances: int = DEFAULT_INSTANCES,
    max_tasks_per_instance: int | None = None,
    max_memory_per_instance: int | None = None,
    cost: Callable[..., Any] | None = None,
    max_batch_cost: float | None = None,
    padded: bool = False,
    bucket: bool = False,
    coalesce: bool = False,
    **task_options: Any,
) -> Any:
    """Define a batched task on ``app``.

    Function form, as a decorator: ``@batched(app, batch_size=32, max_delay=0.01)`` over ``def predict(text,
    scale=1.0)``; the function is called once per batch with every parameter as a list (one entry per request),
    and returns one result per request.

    Model form: ``batched(app, model=SentimentModel, name="shop.sentiment")``; per-request parameters come from
    ``SentimentModel.run``, and each batch calls ``run_batch(**lists)`` on one instance built lazily per worker
    process. ``model`` may also be a zero-argument factory annotated to return the model class.

    ``max_delay`` (seconds) bounds how long the oldest request of a forming batch waits for more; 0 never waits.
    ``queue`` defaults to ``batching.<task name>``. ``lease_s``: how long a claimed batch stays its consumer's
    after the last heartbeat. ``max_deliveries``: deliveries that end in a consumer crash before a message is
    dead-lettered. ``max_message_bytes``: larger messages fail without being decoded. ``isolate_errors``: when
    ``run_batch`` raises, bisect the batch so only the culprit requests fail (False: the whole batch fails).
    ``max_queue_size``: most requests that may wait in the queue; a send that would leave more raises
    ``QueueFull`` in the client, atomically across every client (None: unbounded). ``wait_replicas``: durable
    mode — every send, claim, result write and finish waits up to ``wait_timeout`` seconds for that many Redis
    replicas to acknowledge it (``NotReplicated`` otherwise), so a failover loses no acknowledged request.
    ``instances``: model instances per worker; more than one run each in its own process beside the worker,
    supervised and restarted by it. ``max_tasks_per_instance`` / ``max_memory_per_instance`` (KiB): replace an
    instance process after that many requests, or once its resident memory exceeds that (as Celery's
    ``max_tasks_per_child`` / ``max_memory_per_child``); either one also puts a single instance in a process.
    ``cost``: a function of one request's arguments (by name, defaults applied; it may name only those it needs)
    returning its cost, a number >= 0, computed in the client at submit. ``max_batch_cost``: no batch costs more;
    a request costing more raises ``CostTooLarge`` at submit. ``padded``: a batch costs its longest item times its
    count (a model that pads to the longest input), not the sum. ``bucket``: form each batch from a window of the
    oldest waiting requests, grouping similar costs; none is held back past ``max_delay`` (which must be > 0).
    ``coalesce``: identical requests (same arguments, see ``batching.coalesce``) in flight at once run once, across
    batches and workers, and every caller gets that result or error.
    Other keyword arguments are Celery task options (``time_limit``, ``soft_time_limit``, ``ignore_result``, ...);
    an option that is neither raises ``ConfigurationError`` naming it and the valid ones.
    """
    check_task_options(task_options)
    _check_rate_limit(task_options.get("rate_limit"))
    own: dict[str, Any] = dict(
        name=name, batch_size=batch_size, max_delay=max_delay, queue=queue, lease_s=lease_s,
        max_deliveries=max_deliveries, max_message_bytes=max_message_bytes, isolate_errors=isolate_errors,
        max_queue_size=max_queue_size, wait_replicas=wait_replicas, wait_timeout=wait_timeout,
        instances=instances, max_tasks_per_instance=max_tasks_per_instance,
        max_memory_per_instance=max_memory_per_instance,
        cost=cost, max_batch_cost=max_batch_cost, padded=padded, bucket=bucket,
        coalesce=coalesce,
    )
    if fn is None and model is None:
        return functools.partial(batched, app, **own, **task_options)
    if fn is not None and model is not None:
        raise ConfigurationError("pass either a batch function or model=, not both")
    if fn is not None:
        spec = CallSpec.from_callable(fn)
        task_name = name or app.gen_task_name(fn.__name__, fn.__module__)
        body, doc, handle = fn, fn.__doc__, ModelHandle(fn=fn)
    else:
        assert model is not None
        model_class = _model_class(model)
        spec = CallSpec.from_callable(functools.partial(model_class.run, None))
        task_name = name or app.gen_task_name(model_class.__name__, model_class.__module__)
        body, doc, handle = _per_request_stub(model_class), model_class.__doc__, ModelHandle(factory=model)
    policy = FlushPolicy(batch_size, max_delay)
    settings = BatchSettings(
        name=task_name, queue=queue or f"batching.{task_name}", spec=spec, policy=policy,
        lease_s=lease_s, max_deliveries=max_deliveries, max_message_bytes=max_message_bytes,
        isolate_errors=isolate_errors, max_queue_size=max_queue_size, wait_replicas=wait_replicas,
        wait_timeout=wait_timeout, instances=instances,
        max_tasks_per_instance=max_tasks_per_instance, max_memory_per_instance=max_memory_per_instance,
        cost=CostSpec.build(task_name, cost, spec, max_batch_cost=max_batch_cost, padded=padded, bucket=bucket,
                            max_delay_s=policy.max_delay_s),
        coalesce=coalesce,
    )
    app.steps["worker"].add(WORKER_STEP)  # a set: defining many tasks registers it once
    routing.register(app, task_name, settings.queue)  # in the app's queues (purge) and routes (send_task)
    return app.task(
        body, name=task_name, base=BatchedTask, batching=settings, batching_model=handle, queue=settings.queue,
        __doc__=doc, **task_options,
    )


def _check_rate_limit(spec: Any) -> None:
    if spec is None:
        return
    try:
        ok = rate(spec) >= 0
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigurationError(
            f"rate_limit {spec!r} is not a rate: use items per second, minute or hour per worker, e.g. '5/s', "
            "'100/m', '2/h', or a number (per second)"
        )


def _model_class(model: Callable[[], Any]) -> Any:
    """The class whose ``run`` defines the per-request signature, without building a model."""
    cls: Any = model
    if not inspect.isclass(model):
        try:
            cls = typing.get_type_hints(model).get("return")
        except Exception:
            cls = None
        if not inspect.isclass(cls):
            raise ConfigurationError(
                f"model factory {model!r} must be annotated with the class it returns (-> MyModel), so the task's "
                "parameters are known without loading the model"
            )
    for method in ("run", "run_batch"):
        if not callable(getattr(cls, method, None)):
            raise ConfigurationError(f"model class {cls.__name__} has no {method}() method")
    return cls


def _per_request_stub(model_class: Any) -> Callable[..., Any]:
    """A function with ``model_class.run``'s per-request signature, so Celery tooling shows the right params."""

    def run(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - BatchedTask.__call__ is used instead
        raise NotImplementedError

    sig = inspect.signature(functools.partial(model_class.run, None))
    run.__signature__ = sig  # type: ignore[attr-defined]
    run.__name__ = model_class.__name__
    run.__module__ = model_class.__module__
    return run


def batched_tasks(app: Celery) -> list[BatchedTask]:
    """The app's batched tasks, by name."""
    return sorted((t for t in app.tasks.values() if isinstance(t, BatchedTask)), key=lambda t: t.name)
