"""`python -m bench.soak`: does one ours worker's memory stay flat over a million tasks?

One private redis-server, one ours worker (`--pool solo`, the noop model, batch 64) draining, and the clients:
`--feeders` feeder subprocesses that top the queue up with `submit_many` whenever it falls below `LOW_WATER` (to
`HIGH_WATER`), so Redis never holds much more than 20k messages, and this process, which takes every result out
with MGET + DEL as soon as the consumers' counter says it is stored, so a million results never pile up in Redis
(they also expire after `RESULT_EXPIRES_S`). Feeders hand the task ids over through a Redis list. There are two
of them, in processes of their own, because one `submit_many` loop (about 10k/s alone, 6k/s beside a busy
worker on 2 cores) is slower than the worker (12k/s alone) and would leave the queue empty most of the time.
The worker's RSS is read from /proc every `--sample-every` completed tasks; with `--instances N` (ours'
`instances=N`), the worker's RSS is that of its main process and its N instance processes together, and each
process's own is recorded too.

Checks at the end: N distinct results, all SUCCESS; the consumers' `requests` counter == N (a request run twice
would count twice); no result key reappeared after it was taken (a re-run writes it again); nothing left queued,
claimed, delayed or dead-lettered. Ctrl-C or SIGTERM stops the worker and the redis-server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

import redis

from bench import inproc, report, session
from bench.config import AppSettings
from bench.processes import (
    BenchError,
    celery_worker_pid,
    child_env,
    instance_pids,
    memory_kib,
    running,
    spawn,
    stop,
)
from bench.runner import count_error_lines
from bench.stats import slope

#: The queue is topped up when fewer messages than this wait in it...
LOW_WATER = 10_000
#: ... to this many.
HIGH_WATER = 20_000
#: Messages per `submit_many` call: the queue depth is checked again after each.
SUBMIT_CHUNK = 2_000
#: The Redis list through which the feeders hand the result keys of what they sent to the collector.
IDS_KEY = "bench:soak:ids"
#: Result keys looked at per MGET.
COLLECT_CHUNK = 5_000
#: Celery's result_expires for the soak app, in seconds: a safety net, results are taken out as they land.
RESULT_EXPIRES_S = 60
#: How long the drain may go without one new result before the worker is called stalled, in seconds.
STALL_S = 60.0
#: Pause between polls when there is nothing to do, in seconds.
IDLE_S = 0.02


class Soak:
    def __init__(self, *, n: int, feeders: int, sample_every: int, url: str, python: str, logs: Path,
                 instances: int = 1) -> None:
        self.n, self.feeders, self.sample_every, self.python, self.logs = n, feeders, sample_every, python, logs
        self.settings = AppSettings(
            redis_url=url, model="noop", batch_size=64, max_delay_s=0.0, result_expires_s=RESULT_EXPIRES_S,
            instances=instances,
        )
        self.redis = redis.Redis.from_url(url)
        self.done = self.failed = 0
        #: Result keys of the tasks submitted and not yet collected, oldest first.
        self.pending: deque[bytes] = deque()
        self.samples: list[dict[str, Any]] = []
        self.depths: list[int] = []

    def run(self) -> dict[str, Any]:
        self.redis.flushall()
        log = self.logs / "soak.worker.log"
        env = child_env(self.settings.to_env())
        feeder_cmd = [self.python, "-m", "bench.soak", "--n", str(self.n), "--feeders", str(self.feeders), "--feeder"]
        with running(inproc.worker_cmd(self.python, name="soak"), env=env, log=log) as proc:
            flog = self.logs / "soak.feeder.log"
            feeders = [spawn([*feeder_cmd, str(k)], env=env, log=flog) for k in range(self.feeders)]
            started = time.monotonic()
            pid = celery_worker_pid(proc.pid)
            first: tuple[float, int] | None = None
            next_sample, last_progress = self.sample_every, time.monotonic()
            while self.done < self.n:
                if proc.poll() is not None:
                    raise BenchError(f"worker exited with {proc.returncode} after {self.done} tasks (log: {log})")
                if any(f.poll() for f in feeders):
                    raise BenchError(f"a feeder failed (log: {self.logs / 'soak.feeder.log'})")
                got = self._collect()
                now = time.monotonic()
                if got:
                    last_progress = now
                    first = first or (now, self.done)
                elif now - last_progress > STALL_S:
                    raise BenchError(f"no result for {STALL_S:.0f} s at {self.done}/{self.n} (log: {log})")
                else:
                    time.sleep(IDLE_S)
                if self.done >= next_sample or self.done >= self.n:
                    self._sample(pid, now - started)
                    next_sample += self.sample_every
            ended = time.monotonic()
            for f in feeders:
                stop(f)
            time.sleep(1.0)  # a request run twice would write its (already taken) result again meanwhile
            checks = self._verify()
            hwm = memory_kib(pid).get("VmHWM")
        assert first is not None
        return {
            "n": self.n,
            "instances": self.settings.instances,
            "worker_pid": pid,
            "elapsed_s": ended - started,
            "rate": (self.done - first[1]) / (ended - first[0]) if ended > first[0] else None,
            "samples": self.samples,
            "queue_depth": {
                "polls": len(self.depths),
                "max": max(self.depths),
                "mean": sum(self.depths) / len(self.depths),
                "empty_share": sum(1 for d in self.depths if d == 0) / len(self.depths),
            },
            "vm_hwm_kib": hwm,
            "checks": checks,
            "worker_log_errors": count_error_lines(log),
        }

    def _collect(self) -> int:
        """Take out the results the consumers say are stored; return how many were new.

        The consumer claims the oldest messages first, so the oldest pending ids are the finished ones: look at
        just as many of them as the `requests` counter grew by, rather than at every pending id. One MGET and one
        DEL of the keys found per chunk: a GETDEL per key cost this process more CPU than the worker has to spare
        (it fell 100k results behind in a 1M run), and only found keys are deleted, so a result stored between
        the two commands is picked up next time.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(inproc.STATS_KEY, "requests")
        pipe.llen(inproc.QUEUE)
        counted, depth = pipe.execute()
        self.depths.append(int(depth))
        budget = min(int(counted or 0) - self.done, COLLECT_CHUNK)
        if len(self.pending) < budget:
            self.pending.extend(cast(list[bytes] | None, self.redis.lpop(IDS_KEY, 10 * COLLECT_CHUNK)) or [])
        keys = [self.pending.popleft() for _ in range(min(budget, len(self.pending)))]
        if not keys:
            return 0
        metas = cast(list[bytes | None], self.redis.mget(keys))
        found = [key for key, raw in zip(keys, metas, strict=True) if raw is not None]
        # Finished out of order, or not yet: look again next time, still first in line.
        self.pending.extendleft(reversed([key for key, raw in zip(keys, metas, strict=True) if raw is None]))
        if found:
            self.redis.delete(*found)
        self.failed += sum(1 for raw in metas if raw is not None and b'"SUCCESS"' not in raw)
        self.done += len(found)
        return len(found)

    def _sample(self, pid: int, t_s: float) -> None:
        info = self.redis.info("memory")
        by_pid = {p: memory_kib(p)["VmRSS"] for p in [pid, *instance_pids(pid)]}
        sample = {
            "done": self.done,
            "t_s": round(t_s, 2),
            "rss_kib": sum(by_pid.values()),
            "rss_by_pid": by_pid,
            "redis_used_kib": int(info["used_memory"]) // 1024,
            "queued": self.redis.llen(inproc.QUEUE),
            # Batches claimed and not finished yet: run, or waiting for their results to be written.
            "claims": self.redis.zcard(inproc.CLAIMS_KEY),
        }
        self.samples.append(sample)
        print(f"  {sample}", flush=True)

    def _verify(self) -> dict[str, Any]:
        stats = inproc.stats_counts(self.redis.hgetall(inproc.STATS_KEY))  # type: ignore[arg-type]
        found = {
            "completed": self.done,
            "failed": self.failed,
            **stats,
            "result_keys_left": sum(1 for _ in self.redis.scan_iter(match=inproc.META_PREFIX + "*", count=1000)),
            "queued": self.redis.llen(inproc.QUEUE),
            "claims": self.redis.zcard(inproc.CLAIMS_KEY),
            "delayed": self.redis.zcard(inproc.DELAYED_KEY),
            "dead": self.redis.llen(inproc.DEAD_KEY),
        }
        expected = {"completed": self.n, "failed": 0, "requests": self.n, "requests_by_size": self.n,
                    "result_keys_left": 0, "queued": 0, "claims": 0, "delayed": 0, "dead": 0}
        found["ok"] = all(found[k] == v for k, v in expected.items())
        return found


def feed(n: int, feeders: int, index: int) -> None:
    """Feeder `index` of `feeders`: send its share of the n inputs, keeping the queue between the water marks."""
    settings = AppSettings.from_env()
    task = inproc.import_ours(settings)
    client = redis.Redis.from_url(settings.redis_url)
    sent, stop_at = index * n // feeders, (index + 1) * n // feeders
    while sent < stop_at:
        depth = client.llen(inproc.QUEUE)
        if depth >= LOW_WATER:
            time.sleep(IDLE_S)
            continue
        # Each feeder adds its share of the gap; both may see the same depth, so the queue can overshoot
        # HIGH_WATER by a chunk per feeder, never more.
        for _ in range(max((HIGH_WATER - depth) // (SUBMIT_CHUNK * feeders), 1)):
            size = min(SUBMIT_CHUNK, stop_at - sent)
            if size <= 0:
                break
            results = task.submit_many([{"x": i} for i in range(sent, sent + size)])
            # After the messages, so a listed key's task is always queued already.
            client.rpush(IDS_KEY, *(inproc.META_PREFIX + r.id for r in results))
            sent += size


def summarize(result: dict[str, Any], reference: int) -> dict[str, Any]:
    """RSS at `reference` tasks and at the end, its max, and its slope from `reference` on (past the warm-up)."""
    samples = result["samples"]
    at_ref = next((s for s in samples if s["done"] >= reference), samples[-1])
    steady = [s for s in samples if s["done"] >= at_ref["done"]]
    per_task = slope([s["done"] for s in steady], [s["rss_kib"] for s in steady])
    return {
        "reference_tasks": at_ref["done"],
        "rss_at_reference_kib": at_ref["rss_kib"],
        "rss_first_kib": samples[0]["rss_kib"],
        "rss_end_kib": samples[-1]["rss_kib"],
        "rss_max_kib": max(s["rss_kib"] for s in samples),
        "slope_kib_per_100k": None if per_task is None else per_task * 100_000,
        "redis_used_max_kib": max(s["redis_used_kib"] for s in samples),
        "claims_max": max(s["claims"] for s in samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tasks in all (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="50,000 tasks, sampled every 2,500")
    parser.add_argument("--sample-every", type=int, default=25_000, help="tasks between RSS samples (default 25k)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the worker (default: this one)")
    parser.add_argument("--feeders", type=int, default=2, help="feeder processes (default 2)")
    parser.add_argument("--instances", type=int, default=1,
                        help="ours' instances=N: model instance processes beside the worker (default 1: none)")
    parser.add_argument("--feeder", type=int, help=argparse.SUPPRESS)  # index: run as that feeder subprocess
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.sample_every = 50_000, 2_500
    if args.n < 1 or args.sample_every < 1 or args.feeders < 1 or args.instances < 1:
        parser.error("need --n, --sample-every, --feeders and --instances >= 1")
    if args.feeder is not None:
        feed(args.n, args.feeders, args.feeder)
        return 0
    console = session.console()
    out: Path = args.out.resolve()

    def measure(url: str) -> dict[str, Any]:
        soak = Soak(n=args.n, feeders=args.feeders, sample_every=args.sample_every, url=url, python=args.python,
                    logs=out / "logs", instances=args.instances)
        return soak.run()

    measured, code = session.on_private_redis("soak", out, console, measure)
    if measured is None:
        return code
    result = measured
    result["summary"] = summarize(result, reference=min(100_000, max(args.n // 10, 1)))
    report.print_soak(result, console)
    path = out / ("soak-quick.json" if args.quick else "soak.json")
    path.write_text(json.dumps(result, indent=1))
    console.print(f"raw results: {path}")
    return 0 if result["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
