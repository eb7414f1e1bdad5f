"""The measurement plan: sessions of (system, model, batch size), each on a freshly flushed private Redis.

One session = FLUSHALL -> pre-fill N requests with no worker running (timed: the client submit rate) -> start
the worker -> wait for all N results (drain rate from their `date_done` stamps) -> open-loop latency at each
offered load on the same, now warm, worker -> stop the worker -> optionally time a bulk submit. Systems are
interleaved within each run rather than run back to back, so slow drift on this noisy 2-core machine spreads
over all of them. A model with an in-process ceiling (`RAW_MODELS`) is also timed alone, once per run, with no
Celery at all (`python -m bench.models raw`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from batching.store.keys import QueueKeys
from bench import peers, redis_cost
from bench.config import AppSettings
from bench.models import PEERS_LACK
from bench.processes import BenchError, child_env, run_json, running
from bench.stats import drain_stats, median

META_PREFIX = "celery-task-meta-"
#: The slowest drain the latency wait budget allows for, in tasks per second.
SLOWEST_DRAIN_PER_S = 20.0
#: How long a freshly started worker may take to store its first result, in seconds (imports, connect).
FIRST_RESULT_TIMEOUT_S = 60.0
#: How long a drain may go without a single new result before the worker is called stalled, in seconds.
STALL_TIMEOUT_S = 30.0
#: Systems whose batch size means something (plain Celery always runs one item per call).
BATCHING_SYSTEMS = ("batches", "ours")
#: Models whose batched call is also timed in-process, without Celery: the ceiling ours is compared with.
RAW_MODELS = frozenset({"embed"})
#: Results looked up per poll round trip while waiting for a drain, and the pause between polls, in seconds.
POLL_WINDOW = 64
POLL_S = 0.1
_ERROR_LINE = re.compile(rb"\b(ERROR|CRITICAL)\b|Traceback")
#: Ours' queue (``bench.systems.ours``), and where its pre-filled messages wait while its instances start.
OURS_QUEUE = "batching.bench.ours.predict"
PARKED = "bench:parked"
#: Moves the list KEYS[1] onto the empty list KEYS[2] in order, in chunks (Lua's unpack has a stack limit).
_RELEASE = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = 1, #items, 4000 do
  redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 3999, #items)))
end
redis.call('DEL', KEYS[1])
return #items
"""


@dataclass(kw_only=True)
class RunConfig:
    n: int
    runs: int
    systems: list[str]
    models: list[str]
    batch_size: int
    #: celery-batches' flush_interval, in seconds (it needs one > 0 to batch at all).
    max_delay_s: float
    #: Ours' max_delay, in seconds: by default 0, the library's greedy default (the latency target is set for it).
    ours_max_delay_s: float
    #: Offered load of the headline latency measure, in requests per second.
    rate: float
    duration_s: float
    #: Offered loads for the latency-vs-load curve (measured in run 0 on `sweep_model` only).
    loads: list[float]
    #: Batch sizes for the throughput-vs-batch-size curve (one run each, `sweep_model` only).
    sweep_sizes: list[int]
    sweep_model: str
    out: Path
    #: Interpreter for plain Celery and ours (celery 5.7 and this project's dependencies).
    python: str
    skipped: dict[str, str] = field(default_factory=dict)
    #: Ours' `instances` values to measure (each a column of its own); 1 is ours' headline column.
    instances: list[int] = field(default_factory=lambda: [1])


class Harness:
    def __init__(self, cfg: RunConfig, url: str) -> None:
        self.cfg = cfg
        self.url = url
        self.redis = redis.Redis.from_url(url)
        self.logs = cfg.out / "logs"

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        sessions: list[dict[str, Any]] = []
        raw: list[dict[str, Any]] = []
        for run in range(cfg.runs):
            for model in cfg.models:
                if model in RAW_MODELS:
                    raw.append(self.raw(model, run))
                for system in cfg.systems:
                    if self._skip(system, model):
                        continue
                    loads = cfg.loads if run == 0 and model == cfg.sweep_model else [cfg.rate]
                    sessions.append(self.session(system, model, cfg.batch_size, run, loads=loads, bulk=True))
                    for instances in (k for k in cfg.instances if k > 1 and system == "ours"):
                        sessions.append(self.session(system, model, cfg.batch_size, run, loads=[cfg.rate],
                                                     bulk=False, instances=instances))
        sweep: list[dict[str, Any]] = []
        for size in cfg.sweep_sizes:
            for system in (s for s in cfg.systems if s in BATCHING_SYSTEMS):
                if self._skip(system, cfg.sweep_model):
                    continue
                if size != cfg.batch_size:  # that point is the headline drain, already measured R times
                    sweep.append(self.session(system, cfg.sweep_model, size, 0, loads=[], bulk=False))
        info = self.redis.info("server")
        raw_by = sorted({r["model"] for r in raw})
        return {
            "config": {**asdict(cfg), "out": str(cfg.out)},
            "redis_server": info.get("redis_version"),
            "sessions": sessions,
            "sweep": sweep,
            "raw": raw,
            "summary": summarize(sessions, cfg),
            "raw_summary": {m: {"drain_rate": median(r.get("rate") for r in raw if r["model"] == m)} for m in raw_by},
        }

    def _skip(self, system: str, model: str) -> bool:
        """celery-batches cannot run a model whose package its venv (celery<5.7) lacks. Noted, not failed."""
        if system == "batches" and model in PEERS_LACK:
            self.cfg.skipped[f"batches/{model}"] = f"the peers' venv (celery-batches, celery<5.7) has no " \
                                                   f"{PEERS_LACK[model]}"
            return True
        return False

    def raw(self, model: str, run: int) -> dict[str, Any]:
        """The model's own batched rate at `batch_size`, in a fresh process, on the same inputs as the drain."""
        cfg = self.cfg
        print(f"  raw-{model}-b{cfg.batch_size}-r{run}: n={cfg.n}", flush=True)
        cmd = [cfg.python, "-m", "bench.models", "raw", "--model", model, "--batch-size", str(cfg.batch_size),
               "--n", str(cfg.n)]
        try:
            found = run_json(cmd, env=child_env({}), timeout_s=300 + cfg.n, log=self.logs / f"raw-{model}.log")
        except BenchError as exc:
            print(f"    error: {exc}", flush=True)
            return {"model": model, "run": run, "error": str(exc)}
        return {**found, "run": run}

    def session(
        self, system: str, model: str, batch_size: int, run: int, *, loads: list[float], bulk: bool,
        instances: int = 1,
    ) -> dict[str, Any]:
        cfg = self.cfg
        column = column_of(system, instances)
        tag = f"{column}-{model}-b{batch_size}-r{run}"
        result: dict[str, Any] = {"system": system, "model": model, "batch_size": batch_size, "run": run,
                                  "instances": instances, "column": column}
        delay = cfg.ours_max_delay_s if system == "ours" else cfg.max_delay_s
        settings = AppSettings(redis_url=self.url, model=model, batch_size=batch_size, max_delay_s=delay,
                               instances=instances)
        env = child_env(settings.to_env())
        python = str(peers.interpreter(system, self.logs / "peers-venv.log", cfg.python))
        client = [python, "-m", "bench.client"]
        worker = [
            python,
            "-m",
            "celery",
            "-A",
            f"bench.systems.{system}",
            "worker",
            "--pool",
            "solo",
            "-l",
            "warning",
        ]
        print(f"  {tag}: n={cfg.n} loads={loads}", flush=True)
        try:
            self.redis.flushall()
            filled = run_json(
                [*client, "submit", "--system", system, "--n", str(cfg.n)],
                env=env,
                timeout_s=120 + cfg.n / 100,
                log=self.logs / f"{tag}.client.log",
            )
            result.update(celery=filled["celery"], has_bulk=filled["has_bulk"], submit_rate=filled["rate"])
            if instances > 1:
                # Held back until every instance serves: one starting while another drains would otherwise measure
                # the start (its imports take a core for a second or two), not the serving.
                self.redis.rename(OURS_QUEUE, PARKED)
            redis_before = redis_cost.read(self.redis)
            redis_after: list[redis_cost.Reading] = []
            with running(worker, env=env, log=self.logs / f"{tag}.worker.log") as proc:
                if instances > 1:
                    self._release_when_served(instances)
                started = time.monotonic()
                metas = wait_for_results(self.redis, filled["ids"], lambda: redis_after.append(
                    redis_cost.read(self.redis)))
                result["drain"] = {**drain_stats(metas), "wall_s": time.monotonic() - started}
                if redis_after:
                    result["redis"] = redis_cost.per_task(redis_before, redis_after[0], cfg.n)
                if None in metas:
                    result["drain"]["stalled"] = self._diagnose(proc)
                    raise BenchError(f"worker stalled with {metas.count(None)} of {cfg.n} results missing")
                result["latency"] = [self._latency(client, system, env, load, tag) for load in loads]
            if bulk and filled["has_bulk"]:
                self.redis.flushall()
                sent = run_json(
                    [*client, "submit", "--system", system, "--n", str(cfg.n), "--bulk"],
                    env=env,
                    timeout_s=120 + cfg.n / 100,
                    log=self.logs / f"{tag}.client.log",
                )
                result["bulk_submit_rate"] = sent.get("rate")
        except BenchError as exc:
            # One system failing (a wedged peer, ours not landed yet) must not cost the others' numbers.
            result["error"] = str(exc)
            print(f"    error: {exc}", flush=True)
        result["worker_log_errors"] = count_error_lines(self.logs / f"{tag}.worker.log")
        return result

    def _release_when_served(self, instances: int) -> None:
        """Wait until ``instances`` consumers of ours' queue have sent a heartbeat, then put the parked messages
        back in one script call, in their order: the blocked consumers all wake to a full queue."""
        deadline = time.monotonic() + FIRST_RESULT_TIMEOUT_S
        while self.redis.zcard(QueueKeys(OURS_QUEUE).consumers) < instances:
            if time.monotonic() > deadline:
                raise BenchError(f"{instances} instances of ours did not all start within {FIRST_RESULT_TIMEOUT_S}s")
            time.sleep(0.05)
        self.redis.eval(_RELEASE, 2, PARKED, OURS_QUEUE)

    def _latency(self, client: list[str], system: str, env: dict[str, str], load: float, tag: str) -> dict[str, Any]:
        cfg = self.cfg
        # Past saturation a backlog builds up: give it time to drain at the slowest expected rate, capped so
        # that a wedged worker costs minutes, not hours. Unanswered requests are counted, not waited for.
        wait_s = min(30 + load * cfg.duration_s / SLOWEST_DRAIN_PER_S, 120.0)
        cmd = [
            *client,
            "latency",
            "--system",
            system,
            "--rate",
            str(load),
            "--duration",
            str(cfg.duration_s),
            "--wait",
            f"{wait_s:.0f}",
        ]
        return run_json(cmd, env=env, timeout_s=120 + cfg.duration_s + wait_s, log=self.logs / f"{tag}.client.log")

    def _diagnose(self, proc: subprocess.Popen[Any]) -> dict[str, Any]:
        """Record where the missing requests sit, and ask the worker for a thread dump in its log."""
        lists = {k.decode(errors="replace"): self.redis.llen(k) for k in self.redis.scan_iter(_type="list")}
        found = {"worker_alive": proc.poll() is None, "lists": lists, "unacked": self.redis.hlen("unacked")}
        if proc.poll() is None:
            # Celery's SIGUSR1 handler ("cry") logs every thread's stack: evidence of where it is stuck.
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        return found


def wait_for_results(
    client: redis.Redis, ids: list[str], on_done: Callable[[], None] | None = None
) -> list[bytes | None]:
    """Poll until every id has a stored result or progress stops; return the raw metas in `ids` order.

    The deadline moves with progress rather than being fixed from N, so a slow but healthy drain is never
    cut short while a wedged worker costs half a minute, not the full budget. `on_done` runs as soon as the last
    result is found, before the metas are read (the Redis cost reading ends there).
    """
    pending = list(ids)
    deadline = time.monotonic() + FIRST_RESULT_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        # Results come roughly in queue order: look at the oldest POLL_WINDOW pending ids, and at the next ones
        # only while a whole window is found, so that polling costs Redis about one EXISTS per task (it is part of
        # the Redis cost measured). Timing comes from `date_done`, not from this loop.
        before = len(pending)
        while pending:
            window, rest = pending[:POLL_WINDOW], pending[POLL_WINDOW:]
            pipe = client.pipeline(transaction=False)
            for task_id in window:
                pipe.exists(META_PREFIX + task_id)
            still = [t for t, found in zip(window, pipe.execute(), strict=True) if not found]
            pending = still + rest
            if still:
                break
        if len(pending) < before:
            deadline = time.monotonic() + STALL_TIMEOUT_S
        if pending:
            time.sleep(POLL_S)
    if not pending and on_done is not None:
        on_done()
    metas: list[bytes | None] = []
    for i in range(0, len(ids), 1000):
        # Without decode_responses redis-py returns bytes (its stubs also allow str).
        metas.extend(cast(list[bytes | None], client.mget([META_PREFIX + t for t in ids[i : i + 1000]])))
    return metas


def count_error_lines(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_bytes().splitlines() if _ERROR_LINE.search(line))


def column_of(system: str, instances: int) -> str:
    """The table column of a session: its system, or ``ours-i<N>`` for ours with ``instances=N`` > 1."""
    return system if instances == 1 else f"{system}-i{instances}"


def columns(cfg: RunConfig) -> list[str]:
    """The systems, then ours at each instance count above one."""
    extra = [column_of("ours", k) for k in cfg.instances if k > 1] if "ours" in cfg.systems else []
    return [*cfg.systems, *extra]


def summarize(sessions: list[dict[str, Any]], cfg: RunConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Median over runs of each headline measure, per column (system, or ours at an instance count) and model."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for system in columns(cfg):
        for model in cfg.models:
            mine = [s for s in sessions if s.get("column", s["system"]) == system and s["model"] == model]
            if not mine:
                continue
            at_rate = [_at_load(s, cfg.rate) for s in mine]
            summary.setdefault(system, {})[model] = {
                "drain_rate": median(s.get("drain", {}).get("rate") for s in mine),
                "redis_us_per_task": median(s.get("redis", {}).get("cpu_us_per_task") for s in mine),
                "redis_cmd_us_per_task": median(s.get("redis", {}).get("commands_us_per_task") for s in mine),
                "p50_ms": median(lat.get("p50_ms") for lat in at_rate),
                "p99_ms": median(lat.get("p99_ms") for lat in at_rate),
                "submit_rate": median(s.get("submit_rate") for s in mine),
                "bulk_submit_rate": median(s.get("bulk_submit_rate") for s in mine),
                "runs_ok": sum(1 for s in mine if "error" not in s),
            }
    return summary


def _at_load(session: dict[str, Any], load: float) -> dict[str, Any]:
    return next((lat for lat in session.get("latency", []) if lat.get("offered_rate") == load), {})
