"""The quick-start job: thousands of single-item ``predict.delay()`` calls served in batches by a real worker.

``python -m tasks.demo`` starts a private ``redis-server`` on a free port (unless ``REDIS_URL`` is set), a
``celery -A tasks worker`` subprocess, submits ``--n`` requests one ``delay()`` at a time with a progress bar,
waits for every result and prints throughput, the batch-size histogram and end-to-end latency percentiles.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batching import gather, queue_status
from batching.redis_server import private_redis, terminate

ROOT = Path(__file__).resolve().parent.parent
console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="requests to submit (default: 3000)")
    parser.add_argument("--clients", type=int, default=4, help="client threads calling delay() (default: 4)")
    parser.add_argument("--pool", default="solo", help="worker pool (default: solo)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all results")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    with _redis() as url:
        os.environ["REDIS_URL"] = url
        with _worker(url, args.pool):
            return _run(args.n, args.timeout, max(1, args.clients))


@contextlib.contextmanager
def _redis() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        console.print(f"Using Redis at {url}")
        yield url
        return
    with private_redis() as url:
        console.print(f"Started a private redis-server at {url}")
        yield url


@contextlib.contextmanager
def _worker(url: str, pool: str) -> Iterator[None]:
    """``celery -A tasks worker`` as a subprocess; returns once it logged that it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", pool, "-l", "INFO",
         "--without-mingle", "--without-gossip"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:  # keep reading so the worker never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " ready." in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        with console.status("Starting a worker: celery -A tasks worker"):
            deadline = time.monotonic() + 60
            while not ready.wait(0.1):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the worker did not start:\n" + "".join(lines[-40:]))
        yield
    finally:
        terminate(proc, 30)


def _run(n: int, timeout: float, clients: int) -> int:
    from tasks import app, predict

    backend: Any = app.backend
    before = queue_status(predict).batch_sizes
    words = ["great", "awful", "love", "slow", "fast", "terrible", "nice", "broken", "happy", "sad"]
    sent = [0.0] * n
    ids = [""] * n
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        submit = progress.add_task(f"submitted ({clients} client threads, one delay() per request)", total=n)
        done = progress.add_task("completed", total=n)

        def client(first: int) -> None:  # like a web app's request threads: one request, one delay()
            for i in range(first, n, clients):
                text = f"the service was {words[i % len(words)]} and {words[(i * 7) % len(words)]} #{i}"
                sent[i] = time.time()
                ids[i] = predict.delay(text=text).id
                progress.advance(submit)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [app.AsyncResult(task_id) for task_id in ids]
        values = gather(results, timeout=timeout, on_ready=lambda _i: progress.advance(done))
    metas = [backend.decode_result(m) for m in backend.client.mget([backend.get_key_for_task(i) for i in ids])]
    latencies = sorted(datetime.fromisoformat(m["date_done"]).timestamp() - t for m, t in zip(metas, sent, strict=True))
    last_done = max(datetime.fromisoformat(m["date_done"]).timestamp() for m in metas)
    after = queue_status(predict).batch_sizes
    ran = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    _report(n, values, latencies, last_done - min(sent), {k: v for k, v in ran.items() if v})
    # Pending AsyncResults unsubscribe through Redis when collected: let that happen while it is still up.
    del results
    gc.collect()
    return 0


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def _report(n: int, values: list[float], latencies: list[float], elapsed: float, sizes: dict[int, int]) -> None:
    summary = Table(title=f"{n} predict.delay() calls", show_header=False)
    summary.add_row("throughput", f"{n / elapsed:,.0f} tasks/s (first submit to last result, {elapsed:.2f} s)")
    summary.add_row("latency p50 / p99", f"{_pct(latencies, 0.5) * 1e3:.1f} ms / {_pct(latencies, 0.99) * 1e3:.1f} ms")
    batches = sum(sizes.values())
    summary.add_row("batches", f"{batches} (mean size {sum(k * v for k, v in sizes.items()) / max(batches, 1):.1f})")
    summary.add_row("sample results", ", ".join(f"{v:.3f}" for v in values[:4]))
    console.print(summary)
    hist = Table(title="batch sizes")
    hist.add_column("size", justify="right")
    hist.add_column("batches", justify="right")
    hist.add_column("requests", justify="right")
    hist.add_column("")
    buckets: dict[tuple[int, int], list[int]] = {}
    for size, count in sizes.items():  # power-of-two buckets keep the table short whatever the batch size
        lo = 1 << (size.bit_length() - 1)
        entry = buckets.setdefault((lo, 2 * lo - 1), [0, 0])
        entry[0] += count
        entry[1] += size * count
    top = max((b[1] for b in buckets.values()), default=1)
    for (lo, hi), (count, requests) in sorted(buckets.items()):
        label = str(lo) if lo == hi else f"{lo}-{hi}"
        hist.add_row(label, str(count), str(requests), "█" * max(1, round(30 * requests / top)))
    console.print(hist)


if __name__ == "__main__":
    sys.exit(main())
