"""Riding out Redis outages: which errors mean "Redis is away", the backoff, and one log line per outage."""

from __future__ import annotations

import logging
import threading
import time

import redis

logger = logging.getLogger(__name__)

#: Errors that mean the connection, not the request, failed: retry after a backoff instead of giving up.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)
#: Backoff between attempts while Redis is unreachable, in seconds (doubling up to the maximum).
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0


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
                    "batching %s: Redis unreachable (%s); claimed work stays in Redis, retrying with backoff up to "
                    "%.0fs until it is back", self.name, exc, RETRY_MAX_S,
                )

    def ok(self) -> None:
        if self._since is None:
            return
        with self._lock:
            if self._since is not None:
                logger.warning("batching %s: Redis is back after %.1fs; serving again",
                               self.name, time.monotonic() - self._since)
                self._since = None


def next_backoff(current: float) -> float:
    return min(current * 2, RETRY_MAX_S)
