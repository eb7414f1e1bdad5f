"""Riding out Redis outages: which errors mean "Redis is away", one log line per outage, and retrying with backoff.

The alternative to retrying would be to let a consumer thread end on the first connection error and rely on the
lease to hand its claims to another consumer: correct, but a worker would stop serving after any Redis restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from ..errors import NotReplicated

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean Redis, not the request, is in trouble: retry after a backoff instead of giving up. Any
#: ``RedisError`` counts, not only a lost connection: a Redis at ``maxmemory`` (OOM), loading its data, or a replica
#: that became read-only in a failover refuses commands for a while, and a consumer thread that ended on one of
#: them would leave its claims stuck until a restart. So does a write no replica confirmed (``wait_replicas``).
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, NotReplicated, ConnectionError, OSError)
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)
#: Backoff between attempts while Redis is unreachable, in seconds (doubling up to the maximum).
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0


class Stopped(Exception):
    """A retry loop gave up because its consumer is stopping; what it held is left to the lease."""


class Outage:
    """One warning when Redis goes away and one when it is back, however many threads notice."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                logger.warning(
                    "batching %s: Redis %s (%s: %s); claimed work stays in Redis, retrying with backoff up to "
                    "%.0fs until it is back", self.name, "unreachable" if isinstance(exc, _UNREACHABLE) else "failing",
                    type(exc).__name__, exc, RETRY_MAX_S,
                )

    def ok(self) -> None:
        if self._since is None:
            return
        with self._lock:
            if self._since is not None:
                logger.warning("batching %s: Redis is back after %.1fs; serving again",
                               self.name, time.monotonic() - self._since)
                self._since = None


def with_retries(
    fn: Callable[[], T], outage: Outage, stop: threading.Event, *, unexpected: str | None = None, writes: bool = True,
) -> T:
    """``fn()``, retried with capped backoff while it fails with a Redis connection error.

    Waits on ``stop``, so a stop request ends the wait at once and raises ``Stopped``: once a consumer is
    stopping, a failed attempt is not repeated, and what it was about to write stays in its claim for the lease
    to recover. With ``unexpected`` (what ``fn`` was doing, for the log) any other exception is logged with its
    traceback and retried the same way: a bug of ours must not end a consumer thread silently. Only a call that
    ``writes`` can end an outage: a Redis at maxmemory still serves reads.
    """
    backoff = RETRY_MIN_S
    while True:
        try:
            result = fn()
        except REDIS_ERRORS as exc:
            outage.failed(exc)
        except Exception:
            if unexpected is None:
                raise
            logger.exception("batching %s: unexpected error while %s; continuing", outage.name, unexpected)
        else:
            if writes:
                outage.ok()
            return result
        if stop.wait(backoff):
            raise Stopped(outage.name)
        backoff = min(backoff * 2, RETRY_MAX_S)
