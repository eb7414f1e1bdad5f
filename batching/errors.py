"""Every error this library raises, in one tree.

::

    BatchingError
    ├── ConfigurationError        bad decorator/consumer settings; raised at definition or start-up
    ├── BrokerError               the broker cannot be used (unsupported URL, unreachable at start-up)
    │   ├── BrokerOutOfMemory     (also kombu's OperationalError) Redis refused a send: it is at maxmemory
    │   └── NotReplicated         (``wait_replicas``) a write was not acknowledged by enough replicas in time
    ├── ResultBackendError        ``batching.aio`` cannot wait on this result backend (not Redis)
    ├── QueueFull                 a send would leave more than ``max_queue_size`` requests waiting; nothing stored
    ├── CostError                 (also ValueError) a request's ``cost=`` function raised or returned no usable cost
    │   └── CostTooLarge          a request costs more than ``max_batch_cost``: no batch could ever hold it
    ├── MessageError              a queued message that cannot become a request (stored as the task's FAILURE)
    │   └── ContentDisallowed     its serializer is not in ``accept_content``
    ├── MissingArgumentError      (also ValueError, TypeError) a request lacks required arguments; fails alone
    ├── UnexpectedArgumentError   (also TypeError) a request names parameters the model does not take
    ├── BatchResultError          ``run_batch`` returned something that cannot be split per request
    ├── ResultEncodeError         one request's result cannot be serialized for the result backend
    ├── RequestAbandoned          (also Celery's TaskRevokedError) its caller stopped waiting before it was claimed
    ├── UnbatchedCallError        (also TypeError) a call that would run items one at a time (map, chunks, ...)
    └── BatcherStopped            (also InterruptedError) the in-process ``Batcher`` was stopped

Errors that reach a Celery client are re-raised there with their own type, so each class is importable from
``batching.errors`` on both sides and keeps a one-string constructor (Celery rebuilds them from ``exc_message``).
"""

from __future__ import annotations

from celery.exceptions import TaskRevokedError
from kombu.exceptions import OperationalError


class BatchingError(Exception):
    """Base class of every error raised by ``batching``."""


class ConfigurationError(BatchingError):
    """A batched task or consumer was configured with values that cannot work."""


class BrokerError(BatchingError):
    """The app's broker cannot be used by the batching consumer."""


class NotReplicated(BrokerError):
    """A write reached the Redis master but fewer than ``wait_replicas`` replicas acknowledged it in time.

    Raised by a send of a task with ``wait_replicas``: the message is on the master and will run unless the master
    fails before it replicates, so a caller that must not lose it resends it with the same ``task_id`` (a request
    that then exists twice runs twice and stores the same result twice: at least once, never lost). Inside a
    consumer it is an outage like any Redis error: the write is retried until a replica has it.
    """

    def __init__(self, message: str, acked: int = 0, wanted: int = 1) -> None:
        super().__init__(message)
        self.acked = acked
        self.wanted = wanted


class ResultBackendError(BatchingError):
    """The task's result backend is not one ``batching.aio`` can wait on."""


class QueueFull(BatchingError):
    """A send was refused because it would leave more than the task's ``max_queue_size`` requests waiting.

    Nothing of the send was stored. ``depth`` is how many requests were waiting; ``retry_after`` (seconds) is how
    long the queue needs, at its measured drain rate, to make room for this send — what a web app puts in an HTTP
    ``Retry-After``. Raised in the client only, never stored as a result.
    """

    def __init__(self, message: str, depth: int = 0, retry_after: float = 1.0, limit: int = 0) -> None:
        super().__init__(message)
        self.depth = depth
        self.retry_after = retry_after
        self.limit = limit


class CostError(BatchingError, ValueError):
    """A request's cost could not be used: the task's ``cost=`` function raised, or returned something that is not
    a finite number >= 0. Raised in the client at submit; stored as the task's FAILURE for a message sent by name."""


class CostTooLarge(CostError):
    """A request costs more than the task's ``max_batch_cost``: no batch could ever hold it, so it never runs.

    Raised in the client at submit and nothing is sent; a message sent by name ends FAILURE with it at once (it
    is never put back, so it cannot loop). ``cost`` and ``limit`` are the request's cost and ``max_batch_cost``
    (in the client; a stored error keeps only its message, which names both).
    """

    def __init__(self, message: str, cost: float = 0.0, limit: float = 0.0) -> None:
        super().__init__(message)
        self.cost = cost
        self.limit = limit


class BrokerOutOfMemory(BrokerError, OperationalError):
    """Redis is at its ``maxmemory`` and refuses writes: the request was not queued.

    Also kombu's ``OperationalError``, which is what ``.delay()`` raises for a broker that refuses a send, so
    existing ``except OperationalError`` handlers keep working.
    """


class MessageError(BatchingError):
    """A message in a batch queue could not be decoded into a request."""


class ContentDisallowed(MessageError):
    """A message's serializer is not accepted by the app (``accept_content``)."""


class MissingArgumentError(BatchingError, ValueError, TypeError):
    """A request did not supply every required argument of the model.

    A ``ValueError`` as the batch semantics promise, and a ``TypeError`` as Python says of any call that misses a
    required argument, so a client's ``except TypeError`` around ``.delay()`` catches it too.
    """


class UnexpectedArgumentError(BatchingError, TypeError):
    """A request supplied arguments the model does not take."""


class BatchResultError(BatchingError):
    """``run_batch`` returned a value that does not give one result per request."""


class ResultEncodeError(BatchingError):
    """A result could not be serialized with the result backend's serializer."""


class RequestAbandoned(BatchingError, TaskRevokedError):
    """Its caller stopped waiting (timed out or was cancelled) before any consumer claimed it: it never ran.

    Stored as the task's REVOKED result; a ``TaskRevokedError``, so code that handles revoked tasks handles it.
    """


class UnbatchedCallError(BatchingError, TypeError):
    """A batched task was called in a way that would run its items one at a time in a pool process."""


class BatcherStopped(BatchingError, InterruptedError):
    """The in-process batcher was stopped before this call ran."""
