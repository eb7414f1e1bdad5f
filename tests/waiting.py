"""Polling for a condition the test cannot be told about (another process's progress, a server coming up).

A timeout fails the test with what it was waiting for; ``detail`` adds what explains it (a subprocess's log), read
only when the wait fails. A predicate may raise to fail at once, e.g. when the process it waits for has exited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    fetch: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``fetch`` until it returns something truthy, and return that. Fails the test at ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := fetch()):
        if time.monotonic() > deadline:
            message = f"timed out after {timeout}s waiting for {what}"
            raise AssertionError(f"{message}\n{detail()}" if detail else message)
        time.sleep(interval)
    return value


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails the test at ``timeout``."""
    start = time.monotonic()
    poll_until(predicate, timeout, what, interval=interval, detail=detail)
    return time.monotonic() - start
