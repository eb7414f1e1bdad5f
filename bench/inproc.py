"""Driving ours from the harness process itself, for the soak and scale-out benchmarks.

The side-by-side harness runs every client as a subprocess so that celery-batches can live in its own
virtualenv; the soak and scale-out benchmarks measure ours alone, and their client must react to the worker
(top the queue up, count results as they land), so they import the ours app module in-process instead.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from bench.config import AppSettings

#: ours' task name and the Redis list its messages wait in (batching's default queue name for it).
TASK_NAME = "bench.ours.predict"
QUEUE = f"batching.{TASK_NAME}"
#: The hash of counters the consumers keep: `size:<n>` batches of n requests, `requests` in all.
STATS_KEY = f"batching:stats:{QUEUE}"
CLAIMS_KEY = f"batching:claims:{QUEUE}"
DELAYED_KEY = f"batching:delayed:{QUEUE}"
DEAD_KEY = f"batching:dead:{QUEUE}"
META_PREFIX = "celery-task-meta-"


def import_ours(settings: AppSettings) -> Any:
    """ours' `predict` task, its app configured by `settings` (the app module reads them from the environment)."""
    os.environ.update(settings.to_env())
    return importlib.import_module("bench.systems.ours").predict


def worker_cmd(python: str, *, name: str) -> list[str]:
    """One ours worker, solo pool, named `name@<host>` so that several can share a host without a clash."""
    return [python, "-m", "celery", "-A", "bench.systems.ours", "worker", "--pool", "solo", "-l", "warning",
            "-n", f"{name}@%h"]


def stats_counts(stats: dict[bytes, bytes]) -> dict[str, int]:
    """The consumers' counters: `requests` as counted, and the requests implied by the batch-size histogram."""
    sizes = {int(k[5:]): int(v) for k, v in stats.items() if k.startswith(b"size:")}
    return {
        "requests": int(stats.get(b"requests", 0)),
        "requests_by_size": sum(size * count for size, count in sizes.items()),
        "batches": sum(sizes.values()),
    }
