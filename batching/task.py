"""``@batched``: a Celery task whose calls are single requests and whose worker side runs them in batches."""

from __future__ import annotations

import functools
import inspect
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult

from .errors import ConfigurationError
from .merge import CallSpec, execute
from .policy import FlushPolicy

#: Default seconds a claim outlives its consumer's last heartbeat (sent every lease/4): a dead consumer's batch
#: is back in its queue within about 1.25 times this.
DEFAULT_LEASE_S = 20.0
#: Default deliveries that may end without a result (the consumer died) before a message is dead-lettered.
DEFAULT_MAX_DELIVERIES = 3
#: Default largest message, in bytes, that is decoded at all; larger ones fail unread.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class BatchConfig:
    """Everything the batching consumer needs to know about one batched task."""

    spec: CallSpec
    policy: FlushPolicy
    queue: str
    #: Builds the object whose ``run_batch`` serves the batches; ``None`` for the function form.
    model_factory: Callable[[], Any] | None = None
    batch_fn: Callable[..., Any] | None = None
    lease_s: float = DEFAULT_LEASE_S
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bisect a batch whose run_batch raised, so only the requests that cause the error fail.
    isolate_errors: bool = True
    _model: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run_batch(self) -> Callable[..., Any]:
        """The batch callable; the model is built on first use, once per process, never in a client."""
        if self.batch_fn is not None:
            return self.batch_fn
        with self._lock:
            if self._model is None:
                assert self.model_factory is not None
                self._model = self.model_factory()
            run: Callable[..., Any] = self._model.run_batch
            return run


class BatchedTask(Task):
    """A Celery task whose messages go to their own queue and are executed in batches by ``BatchConsumer``.

    Clients use it like any task (``delay``, ``apply_async``, ``s()``, ``send_task`` by name); arguments are
    checked against the per-request signature and bound to names at call time, so a bad call fails in the
    client with ``TypeError`` rather than later in the worker. Calling the task directly, or with
    ``apply()``/``task_always_eager``, runs a batch of one in-process.
    """

    batching: BatchConfig
    typing = False  # our own binding below replaces Celery's check, and gives clearer messages

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> AsyncResult:
        bound = self.batching.spec.bind(tuple(args or ()), dict(kwargs or {}))
        # When it was sent, for queue-wait metrics and the age of the oldest message (Celery's headers lack it).
        options["headers"] = {"sent_at": time.time(), **(options.get("headers") or {})}
        return super().apply_async((), bound, *rest, **options)

    def submit_many(self, calls: Iterable[Mapping[str, Any] | Sequence[Any]], **options: Any) -> list[AsyncResult]:
        """Enqueue many requests in one round trip per thousand; see ``batching.client.submit_many``."""
        from .client import submit_many

        return submit_many(self, calls, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        (outcome,) = execute(self.batching.spec, self.batching.run_batch(), [(args, kwargs)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def batched(
    app: Celery,
    fn: Callable[..., Any] | None = None,
    *,
    model: Callable[[], Any] | None = None,
    name: str | None = None,
    batch_size: int = 32,
    max_delay: float = 0.0,
    queue: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    isolate_errors: bool = True,
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
    Other keyword arguments are Celery task options (``time_limit``, ``soft_time_limit``, ``ignore_result``, ...).
    """
    if fn is None and model is None:
        return functools.partial(
            batched, app, name=name, batch_size=batch_size, max_delay=max_delay, queue=queue, lease_s=lease_s,
            max_deliveries=max_deliveries, max_message_bytes=max_message_bytes, isolate_errors=isolate_errors,
            **task_options,
        )
    if fn is not None and model is not None:
        raise ConfigurationError("pass either a batch function or model=, not both")
    policy = FlushPolicy(batch_size, float(max_delay))
    if not isinstance(lease_s, (int, float)) or lease_s <= 0:
        raise ConfigurationError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
    if not isinstance(max_deliveries, int) or max_deliveries < 1:
        raise ConfigurationError(f"max_deliveries must be an integer >= 1, got {max_deliveries!r}")
    if not isinstance(max_message_bytes, int) or max_message_bytes < 1:
        raise ConfigurationError(f"max_message_bytes must be a positive integer, got {max_message_bytes!r}")
    if fn is not None:
        spec = CallSpec.from_callable(fn)
        task_name = name or app.gen_task_name(fn.__name__, fn.__module__)
        body, doc = fn, fn.__doc__
    else:
        assert model is not None
        model_class = _model_class(model)
        spec = CallSpec.from_callable(functools.partial(model_class.run, None))
        task_name = name or app.gen_task_name(model_class.__name__, model_class.__module__)
        body, doc = _per_request_stub(model_class), model_class.__doc__
    config = BatchConfig(
        spec=spec, policy=policy, queue=queue or f"batching.{task_name}", model_factory=model,
        batch_fn=fn, lease_s=float(lease_s), max_deliveries=max_deliveries, max_message_bytes=max_message_bytes,
        isolate_errors=isolate_errors,
    )
    from .bootstep import install  # the worker side is wired when the first batched task is defined

    install(app)
    return app.task(
        body, name=task_name, base=BatchedTask, batching=config, queue=config.queue, __doc__=doc, **task_options
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
