"""``batching``: inspect the queues and dead letters of an app's batched tasks; run the demo and the benchmark.

Commands that read Redis load the app the way ``celery -A`` does and use its own broker settings, so they see
exactly the keys its workers and clients use. Exit codes: 0 done, 1 nothing to act on, 2 bad usage or an app
that cannot be loaded, 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import dead as cli_dead
from . import purge as cli_purge
from .common import EXIT_USAGE, CliError, app_command, console, fmt_age, fmt_tuning, open_app, redis_errors

DESCRIPTION = "Inspect the queues and dead letters of an app's batched tasks; run the demo and the benchmark."
EPILOG = """\
exit codes: 0 done; 1 nothing to act on (no batched tasks, ids not found, purge declined);
            2 bad usage or the app cannot be loaded; 3 Redis cannot be reached"""
APP_HELP = ("the Celery app, as for `celery -A`: a module (tasks), module:attribute (proj.celery:app); "
            "imported with the current directory first on sys.path")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers own every option, --help included
        return PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except CliError as exc:
        print(f"batching: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `batching status --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="batching", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = app_command(
        commands, "status", epilog=EPILOG, app_help=APP_HELP,
        help="one row per batched task: queue depth, in flight, backlog, claims, delayed, dead letters, consumers, "
        "why recent batches were flushed, the values the workers use, ...",
        description="One row per batched task of the app: queue depth (all priority lists), messages in flight "
        "(held in consumers' claims), backlog (depth + in flight: what an autoscaler should see), claims, delayed "
        "(waiting for their ETA), dead letters, live consumers (heartbeat within 2 leases), the stalest consumer's "
        "heartbeat age (yellow past 2 leases: wedged or gone), age of the next message to be served and of the "
        "oldest request waiting or in flight (from their sent_at header; '?' without one), batches run and their "
        "mean size, batches of the last 5 minutes by why they were flushed (count, cost, max_delay, empty, "
        "shutdown), and the batch_size / max_delay (/ max_batch_cost) each worker uses now, with how many "
        "workers use them (changed live by `celery -A APP control batching_set`).",
    )
    status.add_argument("--json", action="store_true", help="print the same data as JSON instead of a table")
    status.set_defaults(run=cmd_status)

    dead = commands.add_parser(
        "dead-letters", help="list, requeue or purge dead letters (messages no consumer could finish)",
        description="Dead letters are messages that could not be read far enough to fail their task, or whose "
        "consumers died max_deliveries times while running them.", epilog=EPILOG, formatter_class=fmt,
    )
    cli_dead.add_commands(dead, APP_HELP, EPILOG)
    cli_purge.add_command(commands, APP_HELP, EPILOG)

    commands.add_parser("demo", add_help=False, help="run the quick-start demo (python -m tasks.demo): a private "
                        "Redis, a worker, 3,000 predict.delay() calls; `batching demo --help` for its options")
    commands.add_parser("bench", add_help=False, help="run the benchmark (python -m bench) from a source checkout; "
                        "`batching bench --help` for its options")
    return parser


def cmd_status(args: argparse.Namespace) -> int:
    from ..ops.status import queue_status

    tasks, url = open_app(args.app)
    now = time.time()
    with redis_errors(url), _spinner(f"reading {len(tasks)} queue(s)", enabled=not args.json):
        rows = [queue_status(task) for task in tasks]  # each by Redis's clock
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"app": args.app, "broker": url, "at": now, "tasks": [asdict(r) for r in rows]}, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"batched tasks of {escape(args.app)} on {escape(url)}")
    table.add_column("task")
    table.add_column("queue")
    for title in ("depth", "in flight", "claims", "delayed", "dead", "consumers", "heartbeat", "oldest", "batches",
                  "mean size"):
        table.add_column(title, justify="right")

    # What an autoscaler reads, why batches are the size they are and what each worker uses: a second table, the
    # first is wide enough.
    batching = Table(title="load and batching")
    batching.add_column("task")
    batching.add_column("backlog", justify="right")
    batching.add_column("oldest request", justify="right")
    batching.add_column("batches of the last 5 min, by flush reason")
    batching.add_column("batch_size / max_delay (consumers)")
    for r in rows:
        oldest = "-" if r.depth == 0 else fmt_age(r.oldest_age_s)
        mean = "-" if r.mean_batch_size is None else f"{r.mean_batch_size:.1f}"
        dead = f"[red]{r.dead}[/]" if r.dead else "0"
        consumers = f"[yellow]{r.consumers}[/]" if r.depth and not r.consumers else str(r.consumers)
        stalest = max(r.heartbeat_ages_s.values(), default=None)
        heartbeat = "-" if stalest is None else fmt_age(stalest)
        if stalest is not None and r.consumers and stalest > 2 * r.lease_s:
            heartbeat = f"[yellow]{heartbeat}[/]"  # a consumer that stopped beating: wedged, or gone
        oldest_request = "-" if r.backlog == 0 else fmt_age(r.oldest_request_age_s)
        flushed = " ".join(f"{reason} {n}" for reason, n in r.flush_reasons.items()) or "-"
        table.add_row(escape(r.task), escape(r.queue), str(r.depth), str(r.in_flight), str(r.claims),
                      str(r.delayed), dead, consumers, heartbeat, oldest, str(r.batches), mean)
        batching.add_row(escape(r.task), str(r.backlog), oldest_request, flushed, escape(fmt_tuning(r.tuning)))
    out = console()
    out.print(table)
    out.print(batching)
    for r in rows:
        if r.data_lost_at is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.data_lost_at))
            out.print(f"[red]{escape(r.task)}: Redis lost its data at {when} (a restart without persistence or a "
                      "flush): what was queued or claimed then is gone[/]")
    return 0


@contextlib.contextmanager
def _spinner(text: str, *, enabled: bool) -> Iterator[None]:
    out = console(stderr=True)
    if not (enabled and out.is_terminal):
        yield
        return
    with out.status(text):
        yield


def run_demo(argv: list[str]) -> int:
    return _run_from_checkout("tasks.demo", "the demo (it serves the example app in tasks/)", argv)


def run_bench(argv: list[str]) -> int:
    return _run_from_checkout("bench", "the benchmark", argv)


def _run_from_checkout(module: str, what: str, argv: list[str]) -> int:
    """``python -m module`` from the source checkout this ``batching`` is installed from (``pip install -e``).

    The example app and the benchmark are not installed with the library: a top-level ``tasks`` package would
    shadow the user's own ``tasks`` module, Celery's conventional name.
    """
    root = Path(__file__).resolve().parents[2]
    package = module.split(".")[0]
    if not (root / package).is_dir():
        print(f"batching: {what} runs from a source checkout: there is no {package}/ beside this installation of "
              f"batching ({root}). Clone the repository, `pip install -e '.[example]'` there and run "
              f"`python -m {module}` from it.", file=sys.stderr)
        return EXIT_USAGE
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    # exec rather than a child process: Ctrl-C and SIGTERM reach it, and it stops its own children.
    os.chdir(root)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, "PYTHONPATH": path})


PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"demo": run_demo, "bench": run_bench}


