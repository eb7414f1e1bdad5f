"""Time limits for ``run_batch`` calls, which run on a consumer's model thread rather than in a pool process.

Celery enforces ``soft_time_limit`` with a signal and ``time_limit`` by killing the pool process. Neither works for
a thread, so: the soft limit raises ``SoftTimeLimitExceeded`` inside the model thread (CPython's async exception,
delivered at the next Python bytecode — a model blocked inside one C call sees it when that call returns), and
the hard limit gives up on the call — its requests fail with ``TimeLimitExceeded`` at once and whatever the call
returns later is discarded. No further batch starts until the abandoned call returns, because a model object is
not assumed to be safe to call from two threads.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

if TYPE_CHECKING:
    from ..settings import BatchSettings


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Schedule ``exc_type`` to be raised in another thread; False if that thread is gone."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return bool(done == 1)


@dataclass(frozen=True)
class TimeLimits:
    """Seconds a batch may run: ``soft`` raises in the model, ``hard`` abandons the call. ``None``: no limit."""

    soft: float | None = None
    hard: float | None = None

    @classmethod
    def for_batch(cls, settings: BatchSettings, timelimits: Iterable[Any]) -> TimeLimits:
        """The tightest of the task's own limits and those each request carried (``apply_async(time_limit=…)``).

        The task's limits in ``settings`` already fall back to the app's ``task_(soft_)time_limit``."""
        soft: list[Any] = [settings.soft_time_limit]
        hard: list[Any] = [settings.time_limit]
        for limit in timelimits:
            if isinstance(limit, (list, tuple)) and len(limit) == 2 and limit != _NO_LIMITS:
                hard.append(limit[0])
                soft.append(limit[1])
        return cls(_tightest(soft), _tightest(hard))

    def __bool__(self) -> bool:
        return self.soft is not None or self.hard is not None


#: What a request without limits of its own carries (Celery sends ``[None, None]``): nothing to weigh.
_NO_LIMITS = [None, None]


def _tightest(values: list[Any]) -> float | None:
    """The smallest usable limit: a positive, finite number a timer can wait for (NaN, inf, 1e300 are ignored)."""
    numbers = [
        float(v) for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= threading.TIMEOUT_MAX
        and math.isfinite(v)
    ]
    return min(numbers) if numbers else None


class Watchdog:
    """Arms the limits around one model call made by the current thread.

    A soft limit can only land inside the ``with``: the timer raises under a lock and only while armed, and leaving
    the block disarms it and clears an exception still pending for the thread. Without that, a timer that fired as
    the call returned would raise ``SoftTimeLimitExceeded`` later, anywhere on the model thread.
    """

    def __init__(self, limits: TimeLimits, on_hard: Callable[[], None]) -> None:
        self._timers: list[threading.Timer] = []
        self._ident = threading.get_ident()
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        if limits.soft is not None:
            self._timers.append(threading.Timer(limits.soft, self._soft))
        if limits.hard is not None:
            self._timers.append(threading.Timer(limits.hard, on_hard))

    def _soft(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = raise_in_thread(self._ident, SoftTimeLimitExceeded)

    def __enter__(self) -> Watchdog:
        self._armed = True
        for timer in self._timers:
            timer.daemon = True
            timer.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        with self._lock:
            self._armed = False
            if self._fired:
                # NULL clears an exception that was scheduled but not yet raised (a no-op if it was).
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._ident), None)
        for timer in self._timers:
            timer.cancel()
