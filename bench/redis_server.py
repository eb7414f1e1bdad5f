"""A private, throw-away redis-server on a free loopback port, never the system one on 6379."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.processes import BenchError, child_env, running

#: How long redis-server may take to answer PING after start, in seconds.
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    # Bind-to-0 then close leaves a small window for someone else to take the port; `private_redis` retries
    # for that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def private_redis(workdir: Path, *, attempts: int = 3) -> Iterator[str]:
    """Yield the URL of a fresh redis-server with persistence off; it is killed on exit, error or Ctrl-C."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = _free_port()
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]
        with running(cmd, env=child_env({}), log=workdir / "redis-server.log") as proc:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                except redis.ConnectionError:
                    time.sleep(0.05)
                    continue
                client.close()
                yield url
                return
            client.close()
        if attempt == attempts:
            raise BenchError(f"redis-server did not start (log: {workdir / 'redis-server.log'})")
    raise AssertionError("unreachable")
