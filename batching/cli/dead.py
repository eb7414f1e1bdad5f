"""``batching dead-letters list|requeue|purge``: the operator's side of ``batching.ops.deadletters``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..ops.deadletters import DeadLetter, purge_dead, requeue_dead
from ..store.queue import QueueStore
from .common import (
    EXIT_NOTHING,
    app_command,
    confirmed,
    console,
    fmt_age,
    open_app,
    redis_errors,
)

#: Dead letters re-queued per connection (one script call each), between progress updates.
REQUEUE_CHUNK = 200


def add_commands(parser: argparse.ArgumentParser, app_help: str, epilog: str) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = app_command(
        actions, "list", help="newest dead letters: task id, reason, age, deliveries", epilog=epilog,
        description="The newest dead letters of every batched task of the app (or of --task): task id ('-' when "
        "the message cannot be read that far), why it was dead-lettered, how long ago, and deliveries that never "
        "finished (for messages whose consumers kept dying).", app_help=app_help, task=False,
    )
    listing.add_argument("--limit", type=_positive, default=20, help="newest N per task (default 20)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=cmd_list)

    requeue = app_command(
        actions, "requeue", help="put dead letters back into their queue as new messages", epilog=epilog,
        description="Move dead letters back into the task's queue as new messages, their "
        "delivery counts reset. A letter is moved only if it is still there, so two operators requeuing at once "
        "never duplicate one. Exits 1 if an --id is not among the dead letters (the others are requeued).",
        app_help=app_help, task=True,
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter of the task")
    which.add_argument("--id", nargs="+", dest="ids", metavar="TASK_ID", help="the dead letters of these task ids")
    requeue.set_defaults(run=cmd_requeue)

    purge = app_command(
        actions, "purge", help="delete every dead letter of a task", epilog=epilog,
        description="Delete every dead letter of the task, for good. Asks first; without a terminal to ask on "
        "it refuses (exit 2) unless --yes is given. Exits 1 if the answer is no.", app_help=app_help, task=True,
        confirm=True,
    )
    purge.set_defaults(run=cmd_purge)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _read_dead(task: Any, limit: int | None = None) -> tuple[list[DeadLetter], int]:
    """The newest ``limit`` (default: all) dead letters of the task, and how many there are in all."""
    store, connection = QueueStore.open(task.app, task.batching)
    try:
        total = int(store.client.llen(store.keys.dead))
        entries = store.dead_letters(0, -1 if limit is None else limit - 1)
        return [DeadLetter.parse(e) for e in entries], total
    finally:
        connection.release()


def cmd_list(args: argparse.Namespace) -> int:
    tasks, url = open_app(args.app, args.task)
    now = time.time()
    with redis_errors(url):
        pages = [(task, *_read_dead(task, args.limit)) for task in tasks]
    if args.json:
        out = [{"task": task.name, "queue": task.batching.queue, "total": total,
                "letters": [{"task_id": d.task_id, "reason": d.reason, "at": d.at, "age_s": now - d.at,
                             "deliveries": d.deliveries} for d in letters]} for task, letters, total in pages]
        print(json.dumps({"app": args.app, "broker": url, "at": now, "tasks": out}, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"dead letters of {escape(args.app)} (newest first, up to {args.limit} per task)")
    for title in ("task", "task id", "reason", "age", "deliveries"):
        table.add_column(title, justify="right" if title in ("age", "deliveries") else "left")
    for task, letters, _total in pages:
        for d in letters:
            table.add_row(escape(task.name), escape(d.task_id or "-"), escape(d.reason), fmt_age(now - d.at),
                          "-" if d.deliveries is None else str(d.deliveries))
    out_console = console()
    out_console.print(table)
    for task, letters, total in pages:
        if total > len(letters):
            out_console.print(f"{escape(task.name)}: {len(letters)} of {total} shown (--limit to see more)")
    if not any(total for _task, _letters, total in pages):
        out_console.print("no dead letters")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    (task,), url = open_app(args.app, args.task)
    missing: set[str] = set()
    with redis_errors(url):
        letters, _total = _read_dead(task)
        if args.ids:
            wanted = set(args.ids)
            letters = [d for d in letters if d.task_id in wanted]
            missing = wanted - {d.task_id for d in letters if d.task_id}
        moved = _requeue(task, letters)
    print(f"requeued {moved} dead letter(s) of {task.name} into queue {task.batching.queue}")
    if moved < len(letters):
        print(f"{len(letters) - moved} were gone before they could be moved (requeued or purged meanwhile)")
    if missing:
        print(f"batching: not among the dead letters of {task.name}: {', '.join(sorted(missing))}", file=sys.stderr)
        return EXIT_NOTHING
    return 0


def _requeue(task: Any, letters: list[DeadLetter]) -> int:
    from rich.progress import Progress

    out = console(stderr=True)
    with Progress(console=out, transient=True, disable=len(letters) <= REQUEUE_CHUNK or not out.is_terminal) as bar:
        progress = bar.add_task("requeuing", total=len(letters))
        moved = 0
        for start in range(0, len(letters), REQUEUE_CHUNK):
            chunk = letters[start:start + REQUEUE_CHUNK]
            moved += requeue_dead(task, chunk)
            bar.advance(progress, len(chunk))
    return moved


def cmd_purge(args: argparse.Namespace) -> int:
    (task,), url = open_app(args.app, args.task)
    with redis_errors(url):
        _letters, total = _read_dead(task, limit=1)
        if not total:
            print(f"{task.name} has no dead letters")
            return 0
        if not confirmed(f"Delete {total} dead letter(s) of {task.name} for good?",
                         f"purge {total} dead letter(s) of {task.name}", args.yes):
            return EXIT_NOTHING
        purged = purge_dead(task)
    print(f"purged {purged} dead letter(s) of {task.name}")
    return 0
