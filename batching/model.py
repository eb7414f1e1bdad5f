"""The batch callable of one batched task: the decorated function, or ``run_batch`` of a model built on first use."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class ModelHandle:
    """Owns the model of a model-form task: built lazily, once per process, never in a client.

    A web app that imports the task never builds the model; a worker builds it on its first batch. The process id
    is remembered so that a forked child (a prefork pool) builds its own instead of using a copy whose threads
    and file handles did not survive the fork.
    """

    def __init__(self, fn: Callable[..., Any] | None = None, factory: Callable[[], Any] | None = None) -> None:
        if (fn is None) == (factory is None):
            raise ValueError("a ModelHandle takes a batch function or a model factory, exactly one")
        self._fn = fn
        self._factory = factory
        self._model: Any = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        """True once this process has a model (always True for the function form)."""
        return self._fn is not None or (self._model is not None and self._pid == os.getpid())

    def run_batch(self) -> Callable[..., Any]:
        """The callable that serves one batch: ``fn(**lists)`` or ``model.run_batch(**lists)``."""
        if self._fn is not None:
            return self._fn
        with self._lock:
            if not self.built:
                assert self._factory is not None
                self._model, self._pid = self._factory(), os.getpid()
                logger.info("batching: built the model %s in process %d", type(self._model).__name__, self._pid)
            run: Callable[..., Any] = self._model.run_batch
            return run
