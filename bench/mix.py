"""`python -m bench --models embed --mix`: count-only batches vs a token budget vs a token budget with bucketing, on
all-MiniLM-L6-v2 (one CPU thread) and a fixed, seeded mix of text lengths (80 % short, 20 % long; `mix_text`).

Each mode, in each run, on a freshly flushed private Redis: pre-fill N requests, start the worker (`bench.systems.
mix`), wait for every result — items/s from the results' own `date_done` stamps, and padded tokens per real token
from the model's tokenizer — then an open-loop stream at a fixed offered load on the warm worker: p50/p99 latency.
Modes are interleaved within each run, so drift on a noisy machine spreads over all of them; medians are reported.
The coalescing run (`bench.coalesce`) is a separate measurement, called next to this one from `python -m bench`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from bench.config import MIX_BUDGET_ENV, MIX_MODE_ENV, MIX_TOKENS, AppSettings
from bench.config import MIX_MODES as MODES
from bench.processes import BenchError, child_env, run_json, running
from bench.runner import count_error_lines, wait_for_results
from bench.stats import drain_stats, median, ratio


@dataclass(kw_only=True)
class MixConfig:
    n: int
    runs: int
    batch_size: int
    #: Every mode's max_delay, in seconds (bucketing needs one > 0: the longest it holds a request back).
    max_delay_s: float
    #: The budget of a batch, in words, padded: its longest text's words times its count.
    budget: float
    #: Offered load of the latency stream, requests per second, and how long it lasts.
    rate: float
    duration_s: float
    out: Path
    python: str


def run_mix(cfg: MixConfig, url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    sessions: list[dict[str, Any]] = []
    for run in range(cfg.runs):
        for mode in MODES:
            sessions.append(session(cfg, url, client, mode, run))
            # Kept as they come: an interrupted run still leaves the sessions it measured.
            (cfg.out / "mix-sessions.json").write_text(json.dumps(sessions, indent=2))
    summary = {mode: summarize([s for s in sessions if s["mode"] == mode]) for mode in MODES}
    fifo = summary["fifo"]
    for mode in MODES:
        summary[mode]["rate_vs_fifo"] = ratio(summary[mode]["items_per_s"], fifo["items_per_s"])
        summary[mode]["p99_vs_fifo"] = ratio(summary[mode]["p99_ms"], fifo["p99_ms"])
    return {"config": {**asdict(cfg), "out": str(cfg.out)}, "sessions": sessions, "summary": summary}


def session(cfg: MixConfig, url: str, client: redis.Redis, mode: str, run: int) -> dict[str, Any]:
    tag = f"mix-{mode}-r{run}"
    logs = cfg.out / "logs"
    settings = AppSettings(redis_url=url, model="embed", batch_size=cfg.batch_size, max_delay_s=cfg.max_delay_s)
    env = child_env({**settings.to_env(), MIX_MODE_ENV: mode, MIX_BUDGET_ENV: repr(cfg.budget)})
    bench_client = [cfg.python, "-m", "bench.client"]
    worker = [cfg.python, "-m", "celery", "-A", "bench.systems.mix", "worker", "--pool", "solo", "-l", "warning"]
    result: dict[str, Any] = {"mode": mode, "run": run}
    print(f"  {tag}: n={cfg.n} rate={cfg.rate}/s", flush=True)
    try:
        client.flushall()
        filled = run_json([*bench_client, "submit", "--system", "mix", "--n", str(cfg.n), "--bulk"], env=env,
                          timeout_s=120 + cfg.n / 100, log=logs / f"{tag}.client.log")
        with running(worker, env=env, log=logs / f"{tag}.worker.log"):
            started = time.monotonic()
            metas = wait_for_results(client, filled["ids"])
            result["drain"] = {**drain_stats(metas), "wall_s": time.monotonic() - started}
            if None in metas:
                raise BenchError(f"worker stalled with {metas.count(None)} of {cfg.n} results missing")
            counts = {k.decode(): int(v) for k, v in client.hgetall(MIX_TOKENS).items()}  # type: ignore[union-attr]
            result["tokens"] = counts
            result["latency"] = run_json(
                [*bench_client, "latency", "--system", "mix", "--rate", str(cfg.rate), "--duration",
                 str(cfg.duration_s), "--wait", "120"],
                env=env, timeout_s=300 + cfg.duration_s, log=logs / f"{tag}.client.log",
            )
            result["latency"].pop("samples_ms", None)
    except BenchError as exc:
        result["error"] = str(exc)
        print(f"    error: {exc}", flush=True)
    result["worker_log_errors"] = count_error_lines(logs / f"{tag}.worker.log")
    return result


def summarize(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in sessions if "error" not in s]
    tokens = [s["tokens"] for s in ok]
    return {
        "runs": len(ok),
        "items_per_s": median(s["drain"]["rate"] for s in ok),
        "padded_per_real": median(ratio(t.get("padded"), t.get("real")) for t in tokens),
        "items_per_batch": median(ratio(t.get("items"), t.get("batches")) for t in tokens),
        "p50_ms": median(s["latency"].get("p50_ms") for s in ok),
        "p99_ms": median(s["latency"].get("p99_ms") for s in ok),
    }


def print_table(results: dict[str, Any], console: Console) -> None:
    cfg = results["config"]
    table = Table(title=f"all-MiniLM-L6-v2, 80 % short / 20 % long texts: n={cfg['n']}, batch_size="
                        f"{cfg['batch_size']}, max_delay={cfg['max_delay_s']}s, budget={cfg['budget']:g} words "
                        f"padded; latency at {cfg['rate']:g} req/s; medians of {cfg['runs']} run(s)")
    for column in ("batching", "items/s", "vs fifo", "padded/real tokens", "items/batch", "p50 ms", "p99 ms",
                   "p99 vs fifo"):
        table.add_column(column, justify="left" if column == "batching" else "right")
    names = {"fifo": "count only (FIFO)", "budget": "token budget", "bucket": "token budget + bucketing"}

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for mode, row in results["summary"].items():
        table.add_row(names[mode], cell(row["items_per_s"], ".1f"), cell(row["rate_vs_fifo"], ".2f") + "x",
                      cell(row["padded_per_real"], ".2f"), cell(row["items_per_batch"], ".1f"),
                      cell(row["p50_ms"], ".0f"), cell(row["p99_ms"], ".0f"), cell(row["p99_vs_fifo"], ".2f") + "x")
    console.print(table)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "mix.json"
    path.write_text(json.dumps(results, indent=2))
    return path
