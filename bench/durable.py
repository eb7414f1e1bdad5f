"""`python -m bench.durable`: what durable mode (`wait_replicas=1`) costs, against asynchronous replication.

One private master with one replica on loopback, the no-op model, one solo worker. For each mode, in one run:
`.delay()` sends per second from one client thread, `submit_many` sends per second, and the worker's drain rate
over a pre-filled queue (from the results' own `date_done` stamps, as `python -m bench` measures it). Medians of
`--runs`, and the durable/asynchronous ratios.

Imported by the worker too (`celery -A bench.durable`): then it is just the app, configured from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from batching import batched, submit_many
from batching.redis_server import find_redis_server, private_redis, terminate
from bench.processes import child_env, spawn, stop
from bench.stats import drain_stats, median, ratio

app = Celery("bench_durable", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


@batched(app, batch_size=64, wait_replicas=int(os.environ.get("WAIT_REPLICAS", "0")), name="bench_durable.noop")
def noop(x: list[Any]) -> list[Any]:
    return x


@contextlib.contextmanager
def _replica_of(url: str, workdir: Path) -> Iterator[None]:
    from batching.redis_server import free_port

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(free_port()), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--replicaof", "127.0.0.1", str(port), "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    master = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while int(master.info("replication").get("connected_slaves", 0)) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not attach to the master")
        time.sleep(0.05)
    try:
        yield
    finally:
        terminate(proc, 5)


def _measure(url: str, wait_replicas: int, n: int, workdir: Path) -> dict[str, float | None]:
    import redis

    task = _task(url, wait_replicas)
    client = redis.Redis.from_url(url)
    client.flushdb()
    started = time.perf_counter()
    for i in range(min(n, 1000)):
        task.delay(x=i)
    delay_rate = min(n, 1000) / (time.perf_counter() - started)
    client.flushdb()
    started = time.perf_counter()
    results = submit_many(task, [{"x": i} for i in range(n)])
    many_rate = n / (time.perf_counter() - started)
    env = child_env({"BROKER_URL": url, "WAIT_REPLICAS": str(wait_replicas)})
    worker = spawn([sys.executable, "-m", "celery", "-A", "bench.durable", "worker", "--pool", "solo", "-l", "WARNING",
                    "--without-mingle", "--without-gossip"], env=env, log=workdir / f"worker-{wait_replicas}.log")
    try:
        keys = [f"celery-task-meta-{r.id}" for r in results]
        deadline = time.monotonic() + 300
        while sum(1 for m in client.mget(keys) if m) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the drain did not finish; see {workdir}")
            time.sleep(0.1)
        drain = drain_stats(client.mget(keys)).get("rate")
    finally:
        stop(worker)
    return {"delay/s": delay_rate, "submit_many/s": many_rate, "drain tasks/s": drain}


def _task(url: str, wait_replicas: int) -> Any:
    """The no-op task of an app on ``url`` with ``wait_replicas`` (a fresh app: each mode has its own settings)."""
    mode_app = Celery("bench_durable", broker=url, backend=url)
    mode_app.conf.update(result_expires=600)
    noop_task = batched(mode_app, batch_size=64, wait_replicas=wait_replicas, name="bench_durable.noop", shared=False)
    return noop_task(_identity)


def _identity(x: list[Any]) -> list[Any]:
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="requests per drain (default 5000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode; medians are reported (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-durable-") as tmp, private_redis(workdir=Path(tmp)) as url, \
            _replica_of(url, Path(tmp)):
        rows: dict[int, list[dict[str, float | None]]] = {0: [], 1: []}
        for _ in range(args.runs):
            for mode in (0, 1):  # interleaved: the machine's noise hits both modes alike
                rows[mode].append(_measure(url, mode, args.n, Path(tmp)))
        print(f"{'':>16} {'async (0)':>12} {'durable (1)':>12} {'ratio':>7}")
        for metric in ("delay/s", "submit_many/s", "drain tasks/s"):
            a = median(r[metric] for r in rows[0])
            d = median(r[metric] for r in rows[1])
            r = ratio(d, a)
            print(f"{metric:>16} {a or 0:12.0f} {d or 0:12.0f} {r or 0:7.2f}")


if __name__ == "__main__":
    main()
