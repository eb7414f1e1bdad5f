"""The in-process batcher: threads call ``run(**kwargs)`` one request at a time; one thread runs the batches."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import BatcherStopped
from .merge import CallSpec, execute
from .policy import FlushPolicy

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    arrived: float
    future: Future[Any] = field(default_factory=Future)


class Batcher:
    """Batch concurrent ``run()`` calls into ``model.run_batch(**lists)`` calls.

    Per-request parameters and their defaults come from ``model.run``'s signature. A batch runs when it holds
    ``batch_size`` requests or when its oldest request has waited ``batch_collect_delay_s`` (``None`` or ``0``: run
    what is there as soon as the batch thread is free). ``run()`` returns that request's result or raises its error
    with the original type. ``stop()`` fails every call still waiting with ``BatcherStopped`` and cannot be undone.

    The batch thread lives until ``stop()``: it sleeps on a condition variable while idle, which costs nothing and
    cannot miss a wake-up, unlike a thread that exits when idle and must be restarted by the next caller.
    """

    def __init__(
        self,
        model_name: str,
        model: Any,
        batch_size: int,
        batch_collect_delay_s: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_name = model_name
        self._run_batch: Callable[..., Any] = model.run_batch
        self._spec = CallSpec.from_callable(model.run)
        self._policy = FlushPolicy(batch_size, batch_collect_delay_s or 0.0)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[_Call] = deque()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Submit one request and block until its batch has run."""
        with self._cond:
            if self._stopped:
                raise BatcherStopped(f"batcher {self.model_name!r} is stopped")
            # Stamped under the lock so that arrival times rise along the queue: the flush policy reads the
            # oldest request's time from the head of the queue.
            call = _Call(args, kwargs, self._clock())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"batcher-{self.model_name}", daemon=True
                )
                self._thread.start()
            self._pending.append(call)
            self._cond.notify()
        return call.future.result()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new calls, fail the waiting ones, and wait (up to ``timeout``) for the running batch to finish."""
        with self._cond:
            self._stopped = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        for call in waiting:
            call.future.set_exception(BatcherStopped(f"batcher {self.model_name!r} was stopped"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next_batch(self) -> list[_Call] | None:
        """Block until a batch is due under the flush policy; ``None`` once stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                wait = self._policy.wait_s(
                    self._clock(), self._pending[0].arrived if self._pending else None, len(self._pending)
                )
                if wait is None:
                    take = min(len(self._pending), self._policy.batch_size)
                    return [self._pending.popleft() for _ in range(take)]
                self._cond.wait(None if wait == float("inf") else wait)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                outcomes = execute(self._spec, self._run_batch, [(c.args, c.kwargs) for c in batch])
            except BaseException as exc:  # never leave a caller blocked, even on SystemExit in the model
                # The batch thread ends here, so nothing would serve the calls still queued or yet to come:
                # stop the batcher, so that they fail with BatcherStopped instead of waiting forever.
                with self._cond:
                    self._stopped = True
                    waiting = list(self._pending)
                    self._pending.clear()
                for call in batch:
                    call.future.set_exception(exc)
                for call in waiting:
                    call.future.set_exception(
                        BatcherStopped(f"batcher {self.model_name!r} stopped: its batch thread died of {exc!r}")
                    )
                raise
            for call, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    call.future.set_exception(outcome)
                else:
                    call.future.set_result(outcome)
