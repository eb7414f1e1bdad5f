"""`python -m bench.scale`: does a second ours worker on the same queue add throughput, and run nothing twice?

Two phases on one private redis-server, each on a flushed Redis: pre-fill N requests with no worker running,
then start one worker (phase 1) or `--workers` workers at once (phase 2), all `--pool solo` on the same queue,
and wait for every result. Rates come from the results' own `date_done` stamps, as in the main bench; with
several workers there is also the rate while *all* of them were producing (start-up skew and the tail left
out). The app runs with `result_extended`, so each meta names the worker that stored it (per-worker shares),
and ours' model is wrapped in `bench.models.recording`, which adds every input it ran to a Redis set: N
distinct inputs and N runs means every request ran, and none twice. The consumers' own `requests` counter is
checked against N too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from bench import inproc, report, session
from bench.config import AppSettings
from bench.models import MODELS, RECORD_BY_PID, RECORD_RUNS, RECORD_SEEN
from bench.processes import celery_worker_pid, child_env, running
from bench.runner import count_error_lines, wait_for_results
from bench.stats import drain_stats, overlap_rate


class ScaleOut:
    def __init__(self, *, n: int, model: str, batch_size: int, url: str, python: str, logs: Path) -> None:
        self.n, self.python, self.logs = n, python, logs
        self.settings = AppSettings(
            redis_url=url, model=model, batch_size=batch_size, max_delay_s=0.0, result_extended=True, record=True
        )
        self.redis = redis.Redis.from_url(url)
        self.task = inproc.import_ours(self.settings)

    def phase(self, workers: int) -> dict[str, Any]:
        print(f"  {workers} worker(s): n={self.n}", flush=True)
        self.redis.flushall()
        started = time.perf_counter()
        ids = [r.id for r in self.task.submit_many([{"x": i} for i in range(self.n)])]
        submit_s = time.perf_counter() - started
        env = child_env(self.settings.to_env())
        names = [f"w{k + 1}" for k in range(workers)]
        logs = {name: self.logs / f"scale-{workers}w-{name}.worker.log" for name in names}
        with ExitStack() as stack:
            procs = {
                name: stack.enter_context(running(inproc.worker_cmd(self.python, name=name), env=env, log=logs[name]))
                for name in names
            }
            pids = {celery_worker_pid(proc.pid): name for name, proc in procs.items()}
            metas = wait_for_results(self.redis, ids)
            checks = self._checks(metas)
        by_worker, stamps = _by_worker(metas)
        recorded = {pids.get(int(pid), f"pid {int(pid)}"): int(count)
                    for pid, count in self.redis.hgetall(RECORD_BY_PID).items()}
        return {
            "workers": workers,
            "submit_rate": self.n / submit_s,
            "drain": drain_stats(metas),
            "all_busy": overlap_rate(stamps) if workers > 1 else None,
            "by_worker_meta": by_worker,
            "by_worker_recorded": recorded,
            "checks": checks,
            "worker_log_errors": sum(count_error_lines(log) for log in logs.values()),
        }

    def _checks(self, metas: list[bytes | None]) -> dict[str, Any]:
        counts = inproc.stats_counts(self.redis.hgetall(inproc.STATS_KEY))  # type: ignore[arg-type]
        found = {
            "results": sum(1 for m in metas if m is not None),
            "success": sum(1 for m in metas if m is not None and json.loads(m).get("status") == "SUCCESS"),
            "inputs_distinct": self.redis.scard(RECORD_SEEN),
            "inputs_run": int(self.redis.get(RECORD_RUNS) or 0),
            **counts,
            "claims_left": self.redis.zcard(inproc.CLAIMS_KEY),
            "dead": self.redis.llen(inproc.DEAD_KEY),
        }
        expected = {"results": self.n, "success": self.n, "inputs_distinct": self.n, "inputs_run": self.n,
                    "requests": self.n, "requests_by_size": self.n, "claims_left": 0, "dead": 0}
        found["ok"] = all(found[k] == v for k, v in expected.items())
        return found


def _by_worker(metas: list[bytes | None]) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Results per worker hostname (from result_extended metas) and each worker's `date_done` stamps."""
    counts: Counter[str] = Counter()
    stamps: dict[str, list[float]] = defaultdict(list)
    for raw in metas:
        if raw is None:
            continue
        meta = json.loads(raw)
        worker = str(meta.get("worker") or "?")
        counts[worker] += 1
        if meta.get("date_done"):
            stamps[worker].append(datetime.fromisoformat(meta["date_done"]).timestamp())
    return dict(counts), dict(stamps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000, help="requests per phase (default 40,000)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second phase (default 2)")
    parser.add_argument("--model", choices=tuple(MODELS), default="noop", help="default noop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the workers (default: this one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output dir")
    args = parser.parse_args(argv)
    if args.n < 2 or args.workers < 2 or args.batch_size < 1:
        parser.error("need --n >= 2, --workers >= 2 and --batch-size >= 1")
    console = session.console()
    out: Path = args.out.resolve()

    def measure(url: str) -> list[dict[str, Any]]:
        bench = ScaleOut(n=args.n, model=args.model, batch_size=args.batch_size, url=url, python=args.python,
                         logs=out / "logs")
        return [bench.phase(1), bench.phase(args.workers)]

    phases, code = session.on_private_redis("scale-out", out, console, measure)
    if phases is None:
        return code
    result = {"n": args.n, "model": args.model, "batch_size": args.batch_size, "phases": phases}
    report.print_scale(result, console)
    path = out / "scale.json"
    path.write_text(json.dumps(result, indent=1))
    console.print(f"raw results: {path}")
    return 0 if all(p["checks"]["ok"] for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
