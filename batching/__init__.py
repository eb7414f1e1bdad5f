"""Dynamic batching for Celery tasks that call a model.

Define a task with ``@batched(app, ...)``; call it like any Celery task; ``celery -A app worker`` runs its calls in
batches. Everything a user calls is importable from here; the submodules are the implementation.
"""

from importlib.metadata import PackageNotFoundError, version

from . import aio
from .batcher import Batcher
from .client import gather, submit_many
from .errors import (
    BatcherStopped,
    BatchingError,
    BatchResultError,
    BrokerError,
    BrokerOutOfMemory,
    ConfigurationError,
    ContentDisallowed,
    CostError,
    CostTooLarge,
    MessageError,
    MissingArgumentError,
    NotReplicated,
    QueueFull,
    RequestAbandoned,
    ResultBackendError,
    ResultEncodeError,
    UnbatchedCallError,
    UnexpectedArgumentError,
)
from .ops.deadletters import DeadLetter, list_dead, purge_dead, requeue_dead
from .ops.status import queue_status
from .settings import BatchSettings
from .shared import shared_batched
from .store.snapshot import QueueStatus
from .task import BatchedTask, batched

try:
    __version__ = version("celery-batching")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BatchResultError",
    "BatchSettings",
    "BatchedTask",
    "Batcher",
    "BatcherStopped",
    "BatchingError",
    "BrokerError",
    "BrokerOutOfMemory",
    "ConfigurationError",
    "ContentDisallowed",
    "CostError",
    "CostTooLarge",
    "DeadLetter",
    "MessageError",
    "MissingArgumentError",
    "NotReplicated",
    "QueueFull",
    "QueueStatus",
    "RequestAbandoned",
    "ResultBackendError",
    "ResultEncodeError",
    "UnbatchedCallError",
    "UnexpectedArgumentError",
    "__version__",
    "aio",
    "batched",
    "gather",
    "list_dead",
    "purge_dead",
    "queue_status",
    "requeue_dead",
    "shared_batched",
    "submit_many",
]
