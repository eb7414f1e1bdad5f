"""``batching purge``: empty one batched task's queue — what ``celery purge`` does for every queue, plus the
messages parked until their ETA."""

from __future__ import annotations

import argparse
import sys

from ..store.queue import QueueStore
from .common import EXIT_NOTHING, EXIT_USAGE, CliError, open_app, redis_errors


def add_command(commands: argparse._SubParsersAction, app_help: str, epilog: str) -> None:
    purge = commands.add_parser(
        "purge", help="delete every message waiting in one batched task's queue", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Delete every message waiting in the task's queue (all its priority lists) and every message "
        "parked until its ETA (countdown/eta), for good; their tasks stay PENDING, as with `celery purge`. "
        "Batches already claimed by consumers are kept: they finish and store their results (or come back to "
        "the queue by lease if their consumer dies). Dead letters are kept too (`batching dead-letters purge`). "
        "Asks first; without a terminal to ask on it refuses (exit 2) unless --yes is given.",
    )
    purge.add_argument("-A", "--app", required=True, help=app_help)
    purge.add_argument("--task", required=True, help="the batched task (its full name, or the part after the last "
                       "dot)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=cmd_purge)


def cmd_purge(args: argparse.Namespace) -> int:
    (task,), url = open_app(args.app, args.task)
    queue = task.batching.queue
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"refusing to purge queue {queue} of {task.name} without --yes: stdin is not a terminal "
                           "to confirm on", EXIT_USAGE)
        from rich.prompt import Confirm

        if not Confirm.ask(f"Delete every waiting message of {task.name} (queue {queue}) for good?", default=False):
            print("nothing deleted")
            return EXIT_NOTHING
    with redis_errors(url):
        store, connection = QueueStore.open(task.app, task.batching)
        try:
            queued, delayed = store.purge()
        finally:
            connection.release()
    print(f"purged {queued} queued and {delayed} delayed message(s) of {task.name} from queue {queue}; "
          "claimed batches were kept")
    return 0
