"""``batching purge``: empty one batched task's queue — what ``celery purge`` does for every queue, plus the
messages parked until their ETA."""

from __future__ import annotations

import argparse

from ..store.queue import QueueStore
from .common import EXIT_NOTHING, app_command, confirmed, open_app, redis_errors


def add_command(commands: argparse._SubParsersAction, app_help: str, epilog: str) -> None:
    purge = app_command(
        commands, "purge", help="delete every message waiting in one batched task's queue", epilog=epilog,
        app_help=app_help, task=True, confirm=True,
        description="Delete every message waiting in the task's queue (all its priority lists) and every message "
        "parked until its ETA (countdown/eta), for good; their tasks stay PENDING, as with `celery purge`. "
        "Batches already claimed by consumers are kept: they finish and store their results (or come back to "
        "the queue by lease if their consumer dies). Dead letters are kept too (`batching dead-letters purge`). "
        "Asks first; without a terminal to ask on it refuses (exit 2) unless --yes is given.",
    )
    purge.set_defaults(run=cmd_purge)


def cmd_purge(args: argparse.Namespace) -> int:
    (task,), url = open_app(args.app, args.task)
    queue = task.batching.queue
    if not confirmed(f"Delete every waiting message of {task.name} (queue {queue}) for good?",
                     f"purge queue {queue} of {task.name}", args.yes):
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
