"""Shared fixtures: a real redis-server for the session (or ``REDIS_URL``), real worker subprocesses."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from batching.redis_server import private_redis
from batching.store.queue import Finish, QueueStore
from tests.waiting import poll_until, wait_until

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "Worker", "poll_until", "wait_until"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``REDIS_URL`` when given (a Redis the tests may write to), else a private server on a free port."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    with private_redis() as url:
        os.environ["REDIS_URL"] = url  # the test apps read it at import, like a real deployment would
        yield url
        # Celery's AsyncResult.__del__ unsubscribes through Redis: let it happen while the server is still up,
        # not at interpreter exit.
        gc.collect()


@pytest.fixture
def rclient(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


class Worker:
    """A ``celery -A <app> worker`` subprocess; ``ready()`` blocks on its own 'ready' log line."""

    def __init__(self, app: str, redis_url: str, log: Path, *extra: str, env: dict[str, str] | None = None,
                 mingle: bool = False, prefix: tuple[str, ...] = ()) -> None:
        self.log = log
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        #: The worker's node name, as ``celery inspect -d`` and ``app.control(destination=...)`` take it.
        self.nodename = f"w{os.getpid()}-{time.monotonic_ns()}@{socket.gethostname()}"
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(  # `prefix`: e.g. `ip netns exec NS` to run it on another "host"
                [*prefix, sys.executable, "-m", "celery", "-A", app, "worker", "-l", "INFO",
                 *(() if mingle else ("--without-mingle",)), "--without-gossip", "-n", self.nodename, *extra],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def ready(self, timeout_s: float = 60.0) -> Worker:
        def up() -> bool:
            if " ready." in self.output():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"worker did not become ready:\n{self.output()}")
            return False

        wait_until(up, timeout_s, "the worker to become ready", interval=0.05, detail=self.output)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator:
    """Factory: ``start_worker("tests.apps.shop", "--pool", "solo")`` -> a ``Worker`` (not yet waited for);
    ``mingle=True`` lets it sync revokes from its peers at start, as a production worker does."""
    workers: list[Worker] = []

    def start(app: str = "tests.apps.shop", *extra: str, env: dict[str, str] | None = None,
              mingle: bool = False) -> Worker:
        worker = Worker(app, redis_url, tmp_path / f"worker-{len(workers)}.log", *extra, env=env, mingle=mingle)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="module")
def shop_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One solo-pool worker for the shop app, shared by a module's tests."""
    worker = Worker("tests.apps.shop", redis_url, tmp_path_factory.mktemp("shop") / "worker.log", "--pool", "solo")
    worker.ready()
    yield worker
    worker.stop()


def bury(store: QueueStore, reason: str, raw: bytes) -> None:
    """Dead-letter ``raw`` with ``reason`` the way a consumer does: by finishing a claim of its own with it."""
    claim = store.new_claim()
    store.client.zadd(store.keys.claims, {claim.claim_id: time.time() + 60})
    assert store.finish(claim, Finish(dead=[(reason, raw)]))
