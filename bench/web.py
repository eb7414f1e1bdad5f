"""`python -m bench.web`: how many requests one web process serves while they wait for batched results.

One private redis-server, one `celery -A tasks worker --pool solo` (the example model, `tasks.predict`, batch 64),
one uvicorn process at a time, and `bench.loadgen` (a raw asyncio HTTP client, closed loop, keep-alive, loopback)
in its own process. Three ways of waiting, each at 64, 256 and 1024 concurrent clients:

- `async`: `tasks.web` — `batching.aio.submit` + `batching.aio.wait`, one shared subscription;
- `threaded`: `bench.threaded_web` — the example app before `batching.aio`: `delay()` + `get()` in a thread, at
  most 64 at once;
- `to_thread`: `bench.tothread_web` — `delay()` + `await asyncio.to_thread(result.get)`.

Each run: a warm-up on open connections, then `--seconds` of load. Reported: requests/s (answered 200), p50/p99
latency of those, mean batch size (the consumers' own counters over the run), errors (any other answer or a broken
connection), and the web process's resident memory above its idle level, per request in flight. Then an overload
run: the async app with `PREDICT_MAX_QUEUE_SIZE` set to half a second of drain, a slower worker (`bench.slow_worker`:
the example model at batch 8 plus a 40 ms wait per batch, so that the worker is the bottleneck), an open-loop load
at twice its measured drain rate, reporting the share answered 429, the p99 of the accepted (200) requests, and Redis
memory — each per second, to show they stay flat. `--repeat N` runs it all N times and reports each figure's
median; `--quick` is a smoke run (16 and 64 clients, 2 s each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import redis

from batching.redis_server import free_port
from bench import session
from bench.processes import BenchError, celery_worker_pid, child_env, memory_kib, run_json, running
from bench.stats import median, percentile

APPS = {"async": "tasks.web:app", "threaded": "bench.threaded_web:app", "to_thread": "bench.tothread_web:app"}
STATS_KEY = "batching:stats:batching.tasks.predict"
#: Queue bound of the overload run, in seconds of the worker's measured drain: a request that gets in waits at most
#: about this long for the worker.
OVERLOAD_QUEUE_S = 0.5
#: The overload run's worker: the example model with batches of 8 that also wait 40 ms (``bench.slow_worker``), so
#: that it, not the web process, is the bottleneck (see there).
OVERLOAD_BATCH_SIZE = 8
OVERLOAD_WAIT_MS = 40


class WebBench:
    def __init__(self, url: str, logs: Path, *, seconds: float, warmup_s: float) -> None:
        self.url, self.logs, self.seconds, self.warmup_s = url, logs, seconds, warmup_s
        self.redis = redis.Redis.from_url(url)

    def env(self, **extra: str) -> dict[str, str]:
        return child_env({"REDIS_URL": self.url, "OPENBLAS_NUM_THREADS": "1", **extra})

    def run(self, app: str, clients: int, *, queue_size: int | None = None) -> dict[str, Any]:
        port = free_port()
        env = self.env(**({"PREDICT_MAX_QUEUE_SIZE": str(queue_size)} if queue_size else {}))
        log = self.logs / f"web-{app}-{clients}.log"
        cmd = [sys.executable, "-m", "uvicorn", APPS[app], "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
        with running(cmd, env=env, log=log) as proc:
            _wait_up(port, proc, log)
            self._load(port, 16, 1.0, 0.0, f"warm-{app}-{clients}")  # every code path loaded
            idle_kib = memory_kib(proc.pid)["VmRSS"]  # what the peak adds to this is per request in flight
            peak = _Sampler(lambda: memory_kib(proc.pid)["VmRSS"])
            with peak:
                # One client process that warms up (connections open, batches forming), then is measured; the
                # worker's counters are read around the measured part.
                loadgen = self._start_load(port, clients, self.warmup_s, self.seconds, f"{app}-{clients}")
                time.sleep(self.warmup_s)
                before = self._stats()
                time.sleep(self.seconds)
                after = self._stats()
                samples = self._finish_load(*loadgen)
        # Answers completed within the run: those still in flight at its end would inflate the rate by up to
        # clients / seconds.
        ok = [lat for start, lat, status in samples if status == 200 and 0 <= start + lat <= self.seconds]
        duration = self.seconds
        batches = after[1] - before[1]
        return {
            "app": app, "clients": clients, "rps": len(ok) / duration,
            "p50_ms": _ms(percentile(ok, 0.5)), "p99_ms": _ms(percentile(ok, 0.99)),
            "errors": sum(1 for _, _, status in samples if status != 200), "requests": len(samples),
            "batch_mean": (after[0] - before[0]) / batches if batches else None,
            "rss_idle_mib": idle_kib / 1024, "rss_peak_mib": peak.high / 1024,
            "rss_kib_per_request": max(peak.high - idle_kib, 0) / clients,
        }

    def overload(self, rate: float, queue_size: int) -> dict[str, Any]:
        port = free_port()
        env = self.env(PREDICT_MAX_QUEUE_SIZE=str(queue_size))
        log = self.logs / "web-overload.log"
        cmd = [sys.executable, "-m", "uvicorn", APPS["async"], "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
        with running(cmd, env=env, log=log) as proc:
            _wait_up(port, proc, log)
            memory = _Sampler(lambda: int(self.redis.info("memory")["used_memory"]), every_s=0.5)
            with memory:
                result = run_json(
                    [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--rate", f"{rate:.0f}",
                     "--seconds", str(self.seconds * 2)],
                    env=self.env(), timeout_s=self.seconds * 2 + 120, log=self.logs / "loadgen-overload.log",
                )
        samples = result["samples"]
        seconds = int(self.seconds * 2)
        per_second = []
        for s in range(seconds):
            window = [st for t, _, st in samples if s <= t < s + 1]
            accepted = [lat for t, lat, st in samples if s <= t < s + 1 and st == 200]
            per_second.append({"share_429": window.count(429) / len(window) if window else None,
                               "p99_ms": _ms(percentile(accepted, 0.99))})
        accepted = [lat for _, lat, st in samples if st == 200]
        return {
            "rate": rate, "queue_size": queue_size, "requests": len(samples),
            "share_429": sum(1 for _, _, st in samples if st == 429) / len(samples),
            "accepted_rps": len(accepted) / (self.seconds * 2), "p99_accepted_ms": _ms(percentile(accepted, 0.99)),
            "statuses": dict(Counter(str(st) for _, _, st in samples)), "client_errors": result.get("errors", {}),
            "redis_mib": [v / 2**20 for v in memory.values], "per_second": per_second,
        }

    def _load(self, port: int, clients: int, seconds: float, warmup_s: float,
              name: str) -> list[tuple[float, float, int]]:
        return self._finish_load(*self._start_load(port, clients, warmup_s, seconds, name))

    def _start_load(self, port: int, clients: int, warmup_s: float, seconds: float,
                    name: str) -> tuple[subprocess.Popen[bytes], Path, float]:
        log = self.logs / f"loadgen-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--clients", str(clients),
                 "--warmup", str(warmup_s), "--seconds", str(seconds)],
                env=self.env(), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
            )
        return proc, log, warmup_s + seconds + 120

    def _finish_load(self, proc: subprocess.Popen[bytes], log: Path,
                     timeout_s: float) -> list[tuple[float, float, int]]:
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"load generator timed out (log: {log})") from None
        if proc.returncode != 0:
            raise BenchError(f"load generator exited with {proc.returncode} (log: {log})")
        return [tuple(s) for s in json.loads(stdout.decode().splitlines()[-1])["samples"]]  # type: ignore[misc]

    def _stats(self) -> tuple[int, int]:
        stats: dict[bytes, bytes] = self.redis.hgetall(STATS_KEY)  # type: ignore[assignment]
        batches = sum(int(v) for k, v in stats.items() if k.startswith(b"size:"))
        return int(stats.get(b"requests", 0)), batches


class _Sampler:
    """Samples a value in a thread while its block runs: the high-water mark and every sample."""

    def __init__(self, read: Any, every_s: float = 0.1) -> None:
        self.read, self.every_s = read, every_s
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def high(self) -> int:
        return max(self.values, default=0)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError, redis.RedisError):
                self.values.append(self.read())

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait_up(port: int, proc: Any, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"uvicorn exited with {proc.returncode} (log: {log})")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise BenchError(f"uvicorn did not answer /healthz within 60 s (log: {log})")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def measure(url: str, *, concurrency: list[int], seconds: float, warmup_s: float, logs: Path) -> dict[str, Any]:
    bench = WebBench(url, logs, seconds=seconds, warmup_s=warmup_s)
    worker_log = logs / "web-worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo", "-l", "warning"]
    with running(cmd, env=bench.env(), log=worker_log) as worker:
        celery_worker_pid(worker.pid)
        runs = []
        for clients in concurrency:
            for app in APPS:
                print(f"  {app:9} at {clients:5} clients", flush=True)
                runs.append(bench.run(app, clients))
    # The overload run needs the worker to be the bottleneck (see OVERLOAD_BATCH_SIZE); its drain rate is measured
    # first, through the async app.
    env = bench.env(PREDICT_BATCH_SIZE=str(OVERLOAD_BATCH_SIZE), SLOW_BATCH_MS=str(OVERLOAD_WAIT_MS))
    slow = [sys.executable, "-m", "celery", "-A", "bench.slow_worker", "worker", "--pool", "solo", "-l", "warning"]
    with running(slow, env=env, log=logs / "web-worker-overload.log") as worker:
        celery_worker_pid(worker.pid)
        print(f"  drain rate at batch {OVERLOAD_BATCH_SIZE} + {OVERLOAD_WAIT_MS} ms (async, 256 clients)", flush=True)
        drain = bench.run("async", 256)
        rate = 2 * drain["rps"]
        queue_size = max(16, round(drain["rps"] * OVERLOAD_QUEUE_S))
        print(f"  overload: open loop at {rate:.0f} req/s, max_queue_size={queue_size}", flush=True)
        overload = bench.overload(rate, queue_size)
    overload["drain"] = drain
    return {"runs": runs, "overload": overload}


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over rounds (one round: itself), with the rounds kept under ``rounds``."""
    if len(rounds) == 1:
        return {**rounds[0], "rounds": rounds}
    runs = []
    for i, first in enumerate(rounds[0]["runs"]):
        cells = [r["runs"][i] for r in rounds]
        cell = {k: (median([c[k] for c in cells]) if isinstance(v, (int, float)) else v) for k, v in first.items()}
        cell.update(clients=first["clients"], errors=max(c["errors"] for c in cells))  # errors: the worst round
        runs.append(cell)
    overloads = [r["overload"] for r in rounds]
    overload = dict(overloads[len(overloads) // 2])  # per-second detail and Redis memory: the middle round's
    for key in ("rate", "share_429", "accepted_rps", "p99_accepted_ms"):
        overload[key] = median([o[key] for o in overloads])
    overload["drain"] = {**overload["drain"], "rps": median([o["drain"]["rps"] for o in overloads])}
    return {"runs": runs, "overload": overload, "rounds": rounds}


def print_report(result: dict[str, Any], con: Any) -> None:
    from rich.table import Table

    n = len(result.get("rounds", [])) or 1
    title = "one uvicorn process, one worker (tasks.predict, batch 64), closed-loop clients"
    table = Table(title=title + (f"; medians of {n} rounds" if n > 1 else ""))
    for col in ("clients", "app", "req/s", "p50 ms", "p99 ms", "mean batch", "errors", "RSS KiB / in flight"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        table.add_row(str(r["clients"]), r["app"], f"{r['rps']:,.0f}", _f(r["p50_ms"]), _f(r["p99_ms"]),
                      _f(r["batch_mean"]), str(r["errors"]), f"{r['rss_kib_per_request']:.1f}")
    con.print(table)
    o = result["overload"]
    d = o["drain"]
    con.print(f"overload worker (batch {OVERLOAD_BATCH_SIZE}, +{OVERLOAD_WAIT_MS} ms per batch) drains {d['rps']:,.0f} "
              f"req/s (mean batch {_f(d['batch_mean'])})")
    con.print(f"overload at {o['rate']:,.0f} req/s (2x), max_queue_size={o['queue_size']}: "
              f"{o['share_429']:.0%} answered 429, accepted {o['accepted_rps']:,.0f} req/s with p99 "
              f"{_f(o['p99_accepted_ms'])} ms, answers {o['statuses']} {o['client_errors']}; Redis memory "
              f"{min(o['redis_mib'], default=0):.1f}-{max(o['redis_mib'], default=0):.1f} MiB")
    con.print("per second, 429 share: " + " ".join(_pct(s["share_429"]) for s in o["per_second"]))
    con.print("per second, p99 of accepted (ms): " + " ".join(_f(s["p99_ms"]) for s in o["per_second"]))


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 and 64 clients, 2 s each")
    parser.add_argument("--seconds", type=float, default=None, help="load per run (default 6 s; --quick 2 s)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the report shows each figure's median")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output dir")
    args = parser.parse_args(argv)
    concurrency = [16, 64] if args.quick else [64, 256, 1024]
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    con = session.console()
    out: Path = args.out.resolve()

    def repeated(url: str) -> dict[str, Any]:
        rounds = []
        for k in range(args.repeat):
            if args.repeat > 1:
                print(f"round {k + 1} of {args.repeat}", flush=True)
            rounds.append(measure(url, concurrency=concurrency, seconds=seconds,
                                  warmup_s=1.0 if args.quick else 2.0, logs=out / "logs"))
        return medians(rounds)

    result, code = session.on_private_redis("web bench", out, con, repeated)
    if result is None:
        return code
    print_report(result, con)
    path = out / "web.json"
    path.write_text(json.dumps(result, indent=1))
    con.print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
