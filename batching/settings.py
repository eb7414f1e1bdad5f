"""The settings of one batched task, checked once when it is defined, and the options ``@batched`` accepts.

``BatchSettings`` is what every layer below the task reads: the client (the queue and the signature), the
consumer (batching, leases, limits, retries) and the store (the queue's keys, leases, deliveries). It is frozen:
nothing changes a task's settings behind a running consumer's back — a live change (``batching_set``) is a new,
checked value that the consumer swaps in. Each default is written once, here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .cost import CostSpec
from .errors import ConfigurationError
from .merge import CallSpec
from .policy import FlushPolicy

#: Default requests per batch.
DEFAULT_BATCH_SIZE = 32
#: Default seconds the oldest request of a forming batch waits for more (0: never wait).
DEFAULT_MAX_DELAY_S = 0.0
#: Default seconds a claim outlives its consumer's last heartbeat (sent every lease/4): a dead consumer's batch
#: is back in its queue within about 1.25 times this.
DEFAULT_LEASE_S = 20.0
#: Default deliveries that may end without a result (the consumer died) before a message is dead-lettered.
DEFAULT_MAX_DELIVERIES = 3
#: Default largest message, in bytes, that is decoded at all; larger ones fail unread.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Default seconds a durable write (``wait_replicas``) waits for its replicas' acknowledgement.
DEFAULT_WAIT_TIMEOUT_S = 1.0
#: Default model instances per worker: one, served inside the worker's main process.
DEFAULT_INSTANCES = 1

#: Celery task options a batched task takes as they are (``app.task``'s arguments and ``Task`` attributes that
#: mean something for a task whose calls run in batches). Anything else is refused by name: a misspelt option
#: would otherwise silently become a task attribute that nothing reads.
CELERY_TASK_OPTIONS = frozenset({
    "acks_late", "acks_on_failure_or_timeout", "autoretry_for", "compression", "default_retry_delay",
    "dont_autoretry_for", "exchange", "expires", "ignore_result", "max_retries", "priority", "rate_limit",
    "reject_on_worker_lost", "resultrepr_maxsize", "retry_backoff", "retry_backoff_max", "retry_jitter",
    "retry_kwargs", "routing_key", "send_events", "serializer", "shared", "soft_time_limit",
    "store_eager_result", "store_errors_even_if_ignored", "throws", "time_limit", "track_started", "trail",
})
#: ``@batched``'s own options.
BATCHING_OPTIONS = ("name", "batch_size", "max_delay", "queue", "lease_s", "max_deliveries", "max_message_bytes",
                    "isolate_errors", "max_queue_size", "wait_replicas", "wait_timeout", "instances",
                    "max_tasks_per_instance", "max_memory_per_instance", "cost", "max_batch_cost", "padded", "bucket",
                    "coalesce")


@dataclass(frozen=True)
class RetryPolicy:
    """Per-request automatic retries (Celery's ``autoretry_for`` family), resolved from the task's options."""

    on: tuple[type[BaseException], ...]
    dont: tuple[type[BaseException], ...] = ()
    #: ``None``: retry forever.
    max_retries: int | None = 3
    #: Celery's ``retry_backoff``: False, True (factor 1) or a factor in seconds.
    backoff: float = 0.0
    backoff_max_s: float = 600.0
    jitter: bool = True
    #: Countdown without backoff (Celery's ``default_retry_delay``).
    delay_s: float = 180.0

    @classmethod
    def from_task(cls, task: Any) -> RetryPolicy | None:
        """Celery's retry attributes of ``task``, with Celery's defaults; ``None`` without ``autoretry_for``."""
        on = tuple(getattr(task, "autoretry_for", ()) or ())
        if not on:
            return None
        backoff = getattr(task, "retry_backoff", False)
        return cls(
            on=on,
            dont=tuple(getattr(task, "dont_autoretry_for", ()) or ()),
            max_retries=task.max_retries,
            backoff=float(backoff) if backoff else 0.0,
            backoff_max_s=float(getattr(task, "retry_backoff_max", 600)),
            jitter=bool(getattr(task, "retry_jitter", True)),
            delay_s=float(task.default_retry_delay or 0),
        )


@dataclass(frozen=True)
class BatchSettings:
    """Everything below the task layer needs to know about one batched task."""

    name: str
    queue: str
    spec: CallSpec
    policy: FlushPolicy
    lease_s: float = DEFAULT_LEASE_S
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bisect a batch whose ``run_batch`` raised, so only the requests that cause the error fail.
    isolate_errors: bool = True
    #: Most requests that may wait in the queue (all priorities, not yet claimed); a send that would leave more
    #: raises ``QueueFull`` in the client. ``None``: unbounded, and sends cost nothing extra.
    max_queue_size: int | None = None
    #: Durable mode: every push, claim, result write and finish waits (Redis ``WAIT``) until this many replicas
    #: acknowledged it, at most ``wait_timeout`` seconds, else ``NotReplicated``. 0: asynchronous replication.
    wait_replicas: int = 0
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT_S
    #: Model instances per worker. More than one: each in its own process beside the worker, supervised by it.
    instances: int = DEFAULT_INSTANCES
    #: Requests an instance process serves before it is replaced by a fresh one (Celery's ``max_tasks_per_child``).
    max_tasks_per_instance: int | None = None
    #: Resident memory, in KiB, above which an instance process is replaced after its batch (Celery's
    #: ``max_memory_per_child``, same unit).
    max_memory_per_instance: int | None = None
    #: Cost budget and bucketing (``cost=``, ``max_batch_cost=``, ``padded=``, ``bucket=``); None: batches are
    #: formed by count and time only, and a send computes nothing.
    cost: CostSpec | None = None
    #: Run identical requests in flight at the same time once (``batching.coalesce`` says what identical means).
    coalesce: bool = False
    # The Celery options the consumer acts on, as the worker resolves them from the task (app defaults included).
    ignore_result: bool = False
    time_limit: float | None = None
    soft_time_limit: float | None = None
    retry: RetryPolicy | None = field(default=None)
    #: Store STARTED for each request before its batch runs (``track_started`` / ``task_track_started``).
    track_started: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.lease_s, (int, float)) and not isinstance(self.lease_s, bool)
               and math.isfinite(self.lease_s) and self.lease_s > 0,
               f"lease_s must be a positive number of seconds, got {self.lease_s!r}")
        _check(_is_int(self.max_deliveries) and self.max_deliveries >= 1,
               f"max_deliveries must be an integer >= 1, got {self.max_deliveries!r}")
        _check(_is_int(self.max_message_bytes) and self.max_message_bytes >= 1,
               f"max_message_bytes must be a positive integer, got {self.max_message_bytes!r}")
        _check(isinstance(self.isolate_errors, bool), f"isolate_errors must be True or False, got "
               f"{self.isolate_errors!r}")
        _check(isinstance(self.coalesce, bool), f"coalesce must be True or False, got {self.coalesce!r}")
        _check(self.max_queue_size is None or (_is_int(self.max_queue_size) and self.max_queue_size >= 1),
               f"max_queue_size must be an integer >= 1 or None, got {self.max_queue_size!r}")
        _check(_is_int(self.wait_replicas) and self.wait_replicas >= 0,
               f"wait_replicas must be an integer >= 0, got {self.wait_replicas!r}")
        _check(isinstance(self.wait_timeout, (int, float)) and not isinstance(self.wait_timeout, bool)
               and math.isfinite(self.wait_timeout) and self.wait_timeout >= 0.001,
               f"wait_timeout must be a number of seconds >= 0.001, got {self.wait_timeout!r}")
        _check(isinstance(self.queue, str) and bool(self.queue), f"queue must be a non-empty string, got "
               f"{self.queue!r}")
        _check(_is_int(self.instances) and self.instances >= 1,
               f"instances must be an integer >= 1, got {self.instances!r}")
        for option in ("max_tasks_per_instance", "max_memory_per_instance"):
            value = getattr(self, option)
            _check(value is None or (_is_int(value) and value >= 1),
                   f"{option} must be an integer >= 1 or None, got {value!r}")

    @property
    def in_processes(self) -> bool:
        """Served by instance processes beside the worker rather than inside its main process: more than one
        instance, or one that is recycled (only a process of its own can be replaced)."""
        return self.instances > 1 or self.max_tasks_per_instance is not None \
            or self.max_memory_per_instance is not None


def check_task_options(options: Iterable[str]) -> None:
    """Refuse options that are neither ``@batched``'s nor a Celery task option it takes, naming the valid ones."""
    unknown = sorted(set(options) - CELERY_TASK_OPTIONS - set(BATCHING_OPTIONS))
    if not unknown:
        return
    valid = sorted(CELERY_TASK_OPTIONS | set(BATCHING_OPTIONS))
    hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, valid, 1)) else repr(u)
             for u in unknown]
    raise ConfigurationError(
        f"@batched got undefined option(s): {', '.join(hints)}. Valid options: {', '.join(valid)}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigurationError(message)
