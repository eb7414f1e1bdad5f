"""Dynamic batching for Celery tasks that call a model."""

from .batcher import Batcher
from .errors import (
    BatcherStopped,
    BatchingError,
    BatchResultError,
    BrokerError,
    ConfigurationError,
    ContentDisallowed,
    MessageError,
    MissingArgumentError,
    ResultEncodeError,
    UnexpectedArgumentError,
)
from .task import BatchedTask, batched

__all__ = [
    "BatchResultError",
    "BatchedTask",
    "Batcher",
    "BatcherStopped",
    "BatchingError",
    "BrokerError",
    "ConfigurationError",
    "ContentDisallowed",
    "MessageError",
    "MissingArgumentError",
    "ResultEncodeError",
    "UnexpectedArgumentError",
    "batched",
]
__version__ = "0.1.0"
