"""What every benchmark entry point does around its measurements: signals, console, a private Redis, cleanup."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

from rich.console import Console

from batching.errors import BatchingError
from batching.redis_server import private_redis
from bench.processes import BenchError, stop_all

T = TypeVar("T")


def console() -> Console:
    """Piped output (CI logs, `| tee`) would otherwise be wrapped at rich's 80-column default."""
    return Console() if sys.stdout.isatty() else Console(width=140)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the same `finally` that handles Ctrl-C stops the children.
    raise KeyboardInterrupt(f"signal {signum}")


def on_private_redis(what: str, out: Path, con: Console, body: Callable[[str], T]) -> tuple[T | None, int]:
    """Run ``body(url)`` against a private redis-server under ``out``; every child process is stopped however
    it ends. Returns (result, 0), or (None, exit code) after saying why: 1 for a failed run, 130 if interrupted.
    """
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # Ctrl-C raises KeyboardInterrupt even when started in the background (`&` starts it with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with private_redis(workdir=out / "redis") as url:
            con.print(f"private redis-server at {url}; logs in {out / 'logs'}")
            return body(url), 0
    except (BenchError, BatchingError) as exc:
        con.print(f"[red]{what} failed:[/] {exc}", highlight=False)
        return None, 1
    except KeyboardInterrupt:
        con.print("[red]interrupted[/]: stopping child processes")
        return None, 130
    finally:
        stop_all()  # belt and braces: anything a context manager did not reach
