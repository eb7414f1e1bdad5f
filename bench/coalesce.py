"""`python -m bench.coalesce`: what `coalesce=True` saves on the real model when many requests repeat a few inputs.

The workload is fixed and seeded: N requests, 30 % of them (`--repeat`) one of a few hot texts (`--hot`), the rest
distinct sentences, in a shuffled order that is the same for every run. Each run pre-fills the queue with all N
(`submit_many`), starts one ours worker (`--pool solo`, `tasks.embeddings`' all-MiniLM-L6-v2 on one torch thread,
batch 32), and waits for every result; coalescing off and on alternate, on a flushed Redis each time. Reported,
medians over `--runs`: requests drained per second (from the results' own `date_done` stamps, worker start-up and
model load left out, as in the main bench) and model items per request (inputs `run_batch` was called with, counted
by `bench.models.recording`, over N). Every request must end SUCCESS, or the run fails.

`measure(url, ...)` is the function the main bench can call on its own private Redis.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench import inproc, session
from bench.config import AppSettings
from bench.models import RECORD_RUNS
from bench.processes import child_env, running
from bench.runner import wait_for_results
from bench.stats import drain_stats

#: Share of requests that repeat one of the hot inputs, and how many hot inputs there are.
REPEAT = 0.30
HOT = 5
SEED = 20261203


def workload(n: int, *, repeat: float = REPEAT, hot: int = HOT, seed: int = SEED) -> list[int]:
    """N request inputs (`bench.models.sentence` indices): distinct ones >= 0, the hot ones -1 … -hot."""
    rng = random.Random(seed)
    inputs = [-(1 + rng.randrange(hot)) if rng.random() < repeat else i for i in range(n)]
    rng.shuffle(inputs)
    return inputs


def one_run(url: str, *, inputs: list[int], coalesce: bool, batch_size: int, python: str, log: Path) -> dict[str, Any]:
    settings = AppSettings(redis_url=url, model="embed", batch_size=batch_size, max_delay_s=0.0, record=True,
                           coalesce=coalesce)
    client = redis.Redis.from_url(url)
    client.flushall()
    task = inproc.import_ours(settings)  # the client side does not depend on `coalesce`: the worker's env does
    ids = [r.id for r in task.submit_many([{"x": x} for x in inputs])]
    with running(inproc.worker_cmd(python, name="coalesce" if coalesce else "plain"),
                 env=child_env(settings.to_env()), log=log):
        metas = wait_for_results(client, ids)
    drain = drain_stats(metas)
    succeeded = drain["states"].get("SUCCESS", 0)
    if succeeded != len(inputs):
        raise RuntimeError(f"coalesce={coalesce}: {succeeded} of {len(inputs)} requests succeeded "
                           f"({drain['states']}); see {log}")
    model_items = int(client.get(RECORD_RUNS) or 0)
    return {"coalesce": coalesce, "rate": drain["rate"], "model_items": model_items,
            "items_per_request": model_items / len(inputs), "states": drain["states"]}


def measure(url: str, *, n: int = 1500, runs: int = 3, batch_size: int = 32, python: str = sys.executable,
            logs: Path, repeat: float = REPEAT, hot: int = HOT) -> dict[str, Any]:
    """Coalescing off and on, `runs` times each (alternating), on the Redis at `url`; medians and every run."""
    inputs = workload(n, repeat=repeat, hot=hot)
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for run in range(runs):
        for coalesce in (False, True):
            print(f"  coalesce={'on' if coalesce else 'off'} run {run + 1}/{runs}: n={n}", flush=True)
            results[coalesce].append(one_run(url, inputs=inputs, coalesce=coalesce, batch_size=batch_size,
                                             python=python, log=logs / f"coalesce-{coalesce}-r{run}.worker.log"))
    summary = {
        "on" if coalesce else "off": {
            "rate": statistics.median(r["rate"] for r in rs),
            "items_per_request": statistics.median(r["items_per_request"] for r in rs),
            "runs": rs,
        }
        for coalesce, rs in results.items()
    }
    distinct = len(set(inputs))
    return {"n": n, "repeat": repeat, "hot": hot, "distinct_inputs": distinct, "batch_size": batch_size,
            "runs": runs, **summary}


def report(result: dict[str, Any]) -> str:
    off, on = result["off"], result["on"]
    lines = [
        f"N={result['n']}, {result['repeat']:.0%} repeats of {result['hot']} hot texts "
        f"({result['distinct_inputs']} distinct inputs), batch {result['batch_size']}, median of {result['runs']}",
        f"{'':14}{'requests/s':>12}{'model items per request':>26}",
        f"{'coalesce off':14}{off['rate']:>12,.1f}{off['items_per_request']:>26.3f}",
        f"{'coalesce on':14}{on['rate']:>12,.1f}{on['items_per_request']:>26.3f}",
        f"coalesce on / off: {on['rate'] / off['rate']:.2f}x requests/s, "
        f"{on['items_per_request'] / off['items_per_request']:.2f}x model items",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coalesce", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="requests per run (default 1500)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant; medians are reported (default 3)")
    parser.add_argument("--repeat", type=float, default=REPEAT, help="share of requests that repeat a hot text")
    parser.add_argument("--hot", type=int, default=HOT, help="how many hot texts (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the worker (default: this one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output dir")
    args = parser.parse_args(argv)
    if args.n < 2 or args.runs < 1 or not 0 <= args.repeat <= 1 or args.hot < 1:
        parser.error("need --n >= 2, --runs >= 1, 0 <= --repeat <= 1 and --hot >= 1")
    console = session.console()
    out: Path = args.out.resolve()
    started = time.monotonic()
    result, code = session.on_private_redis(
        "coalescing benchmark", out, console,
        lambda url: measure(url, n=args.n, runs=args.runs, batch_size=args.batch_size, python=args.python,
                            logs=out / "logs", repeat=args.repeat, hot=args.hot),
    )
    if result is None:
        return code
    print(report(result))
    path = out / "coalesce.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"raw results: {path}\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
