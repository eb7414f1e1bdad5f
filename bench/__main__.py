"""`python -m bench`: plain Celery vs celery-batches vs ours, one private redis-server, one command.

Every child process (redis-server, workers, clients) is stopped on normal exit, on error, on Ctrl-C and on
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import peers, report, session
from bench.config import SYSTEMS
from bench.models import MODELS
from bench.runner import Harness, RunConfig


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (got {text!r})")
        return items

    return parse


def _ints(text: str) -> list[int]:
    values = sorted({int(t) for t in text.split(",") if t.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"instance counts are integers >= 1 (got {text!r})")
    return values


def _numbers(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="requests per drain measurement (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement; medians are reported (default 3)")
    parser.add_argument("--systems", type=_csv(SYSTEMS), default=list(SYSTEMS), help="default plain,batches,ours")
    parser.add_argument(
        "--models",
        type=_csv(tuple(MODELS)),
        default=["noop", "accel", "cpu"],
        help="default noop,accel,cpu (cpu: the example app's numpy model, CPU-bound); embed = a real model "
        "(all-MiniLM-L6-v2, one CPU thread): try --n 1500 --runs 1",
    )
    parser.add_argument(
        "--instances",
        type=_ints,
        default=[1, 2],
        help="ours' instances=N values, one column each (default 1,2: the model in the worker's process, and two "
        "model instances in processes of their own)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="ours' batch_size = celery-batches' flush_every")
    parser.add_argument(
        "--max-delay",
        type=float,
        default=0.010,
        help="seconds: celery-batches' flush_interval (default 0.010)",
    )
    parser.add_argument(
        "--ours-max-delay",
        type=float,
        default=0.0,
        help="seconds: ours' max_delay (default 0: the library's greedy default, run what is queued at once)",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="offered load of the latency measure, req/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of open-loop load per latency run")
    parser.add_argument(
        "--loads",
        type=_numbers,
        default=[25, 50, 100, 200, 400],
        help="offered loads for the latency-vs-load plot (run 0 only)",
    )
    parser.add_argument(
        "--sweep-sizes",
        type=_numbers,
        default=[1, 8, 32, 64, 128],
        help="batch sizes for the throughput-vs-batch-size plot (one run each)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for plain Celery and ours, e.g. .venv/bin/python (default: this one)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=200, 1 run, 2 s latency, small sweeps")
    parser.add_argument(
        "--mix",
        action="store_true",
        help="with --models embed: count-only batches vs a token budget vs a budget with bucketing, on a fixed 80 %% "
        "short / 20 %% long mix of texts (bench/mix.py); try --n 600 --runs 1 --batch-size 32",
    )
    parser.add_argument("--mix-budget", type=float, default=512.0, help="--mix: words per batch, padded (default 512)")
    parser.add_argument("--mix-rate", type=float, default=10.0, help="--mix: offered load of the latency stream, req/s")
    parser.add_argument("--mix-duration", type=float, default=20.0, help="--mix: seconds of that stream (default 20)")
    parser.add_argument(
        "--mix-max-delay", type=float, default=0.05, help="--mix: every mode's max_delay, seconds (default 0.05)"
    )
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="with --mix: then coalescing off vs on, where 30 %% of the requests repeat one of 5 texts "
        "(bench/coalesce.py; also alone: python -m bench.coalesce)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "out",
        help="output dir (default bench/out)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.runs, args.duration = min(args.n, 200), 1, 2.0
        args.loads, args.sweep_sizes = [args.rate], [8]
    if (
        args.n < 2
        or args.runs < 1
        or args.batch_size < 1
        or args.max_delay < 0
        or args.ours_max_delay < 0
        or args.rate <= 0
    ):
        parser.error("need --n >= 2, --runs >= 1, --batch-size >= 1, --max-delay >= 0 and --rate > 0")
    if args.coalesce and not args.mix:
        parser.error("--coalesce comes with --mix (--models embed --mix --coalesce)")
    if args.mix and (args.models != ["embed"] or args.mix_budget <= 0 or args.mix_rate <= 0
                     or args.mix_max_delay <= 0):
        parser.error("--mix runs the embed model only (--models embed), with --mix-budget, --mix-rate and "
                     "--mix-max-delay > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = session.console()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.mix:
        return run_mix(args, out, console)
    systems: list[str] = list(args.systems)
    skipped: dict[str, str] = {}
    if "ours" in systems:
        ok, why = peers.ours_available(args.python)
        if not ok:
            systems.remove("ours")
            skipped["ours"] = f"`from batching import batched` fails in {args.python}: {why}"
            console.print(f"[yellow]ours skipped:[/] {why}", highlight=False)
    if not systems:
        console.print("[red]nothing to run[/]")
        return 2
    models = list(args.models)
    cfg = RunConfig(
        n=args.n,
        runs=args.runs,
        systems=systems,
        models=models,
        batch_size=args.batch_size,
        max_delay_s=args.max_delay,
        ours_max_delay_s=args.ours_max_delay,
        rate=args.rate,
        duration_s=args.duration,
        loads=sorted({float(x) for x in [*args.loads, args.rate]}),
        sweep_sizes=sorted({int(x) for x in args.sweep_sizes}),
        sweep_model="accel" if "accel" in models else models[0],
        out=out,
        python=args.python,
        skipped=skipped,
        instances=list(args.instances),
    )
    started = time.monotonic()

    def measure(url: str) -> dict[str, Any]:
        if "batches" in systems:
            console.print(f"peers venv: {peers.ensure_peers_venv(out / 'logs' / 'peers-venv.log')}")
        return Harness(cfg, url).run()

    measured, code = session.on_private_redis("benchmark", out, console, measure)
    if measured is None:
        return code
    results = measured
    results["elapsed_s"] = time.monotonic() - started
    results["skipped"] = skipped
    report.print_table(results, cfg, console)
    console.print(f"raw results: {report.write_json(results, out)}")
    figure = report.plot(results, cfg, out)
    console.print(f"plot: {figure}" if figure else "plot skipped: matplotlib is not installed")
    console.print(f"total {results['elapsed_s']:.0f} s")
    return 0


def run_mix(args: argparse.Namespace, out: Path, console: Any) -> int:
    from bench import mix

    cfg = mix.MixConfig(
        n=args.n, runs=args.runs, batch_size=args.batch_size, max_delay_s=args.mix_max_delay, budget=args.mix_budget,
        rate=args.mix_rate, duration_s=args.mix_duration, out=out, python=args.python,
    )
    results, code = session.on_private_redis("mix benchmark", out, console, lambda url: mix.run_mix(cfg, url))
    if results is None:
        return code
    mix.print_table(results, console)
    console.print(f"raw results: {mix.write_json(results, out)}")
    if args.coalesce:
        from bench import coalesce

        merged, code = session.on_private_redis(
            "coalescing benchmark", out, console,
            lambda url: coalesce.measure(url, n=args.n, runs=args.runs, batch_size=args.batch_size,
                                         python=args.python, logs=out / "logs"),
        )
        if merged is None:
            return code
        console.print(coalesce.report(merged))
        (out / "coalesce.json").write_text(json.dumps(merged, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
