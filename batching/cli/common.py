"""What every ``batching`` command shares: loading the app as ``celery -A`` does, reaching its Redis, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError
from rich.console import Console

from ..errors import BrokerError
from ..store.outage import REDIS_ERRORS
from ..store.queue import require_redis
from ..task import batched_tasks

#: Exit codes (0 is success).
EXIT_NOTHING, EXIT_USAGE, EXIT_REDIS = 1, 2, 3
#: Errors that mean Redis could not be reached or went away (BrokerError: QueueStore.open could not connect).
UNREACHABLE: tuple[type[BaseException], ...] = (BrokerError, OperationalError, *REDIS_ERRORS)


class CliError(Exception):
    """A failure the command reports in one line and exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def console(*, stderr: bool = False) -> Console:
    # Piped output (scripts, CI logs) would otherwise be wrapped at rich's 80-column default.
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, width=None if tty else 160)


def fmt_age(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``4d03h``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_tuning(tuning: dict[str, dict[str, Any]]) -> str:
    """The values the consumers use, ``batch_size / max_delay[ / max_batch_cost]``, each distinct set once with
    how many consumers use it: ``8 / 5ms (2)``; ``-`` when none reported."""
    counts: dict[str, int] = {}
    for values in tuning.values():
        delay = values.get("max_delay", 0)
        parts = [str(values.get("batch_size", "?")), f"{delay * 1000:g}ms" if delay < 1 else f"{delay:g}s"]
        if values.get("max_batch_cost") is not None:
            parts.append(f"{values['max_batch_cost']:g}")
        text = " / ".join(parts)
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{text} ({n})" for text, n in counts.items()) or "-"


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Turn a lost connection in the middle of a command into the one-line 'cannot reach' error."""
    try:
        yield
    except UNREACHABLE as exc:
        cause = exc.__cause__ if isinstance(exc, BrokerError) and exc.__cause__ else exc
        reason = str(cause).replace("\n", " ")
        raise CliError(f"cannot reach Redis at {url} ({reason})", EXIT_REDIS) from exc


def load_app(spec: str) -> Celery:
    """The app named by ``spec``, found exactly as ``celery -A spec`` finds it, with its task modules imported."""
    from celery.app.utils import find_app

    try:
        app = find_app(spec)
        if not isinstance(app, Celery):
            raise CliError(f"{spec!r} is a {type(app).__name__}, not a Celery app", EXIT_USAGE)
        app.loader.import_default_modules()  # the modules of `imports`/`include`, as a worker imports them
    except CliError:
        raise
    except Exception as exc:
        module, _, attribute = spec.partition(":")
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == spec and attribute:
            why = f"module {module!r} has no attribute {attribute!r}"  # find_app's fallback imported 'm:attr'
        elif isinstance(exc, ModuleNotFoundError) and exc.name and f"{module}.".startswith(f"{exc.name}."):
            why += " (run from the directory that contains it, as for celery -A)"
        raise CliError(f"cannot load app {spec!r}: {why}", EXIT_USAGE) from exc
    return app


def batched_tasks_of(app: Celery, spec: str, name: str | None = None) -> list[Any]:
    """The app's batched tasks; with ``name``, the one task of that name (or that last dotted part)."""
    tasks = batched_tasks(app)
    if not tasks:
        raise CliError(f"app {spec!r} has no batched tasks (none of its tasks was made with @batched)", EXIT_NOTHING)
    if name is None:
        return tasks
    chosen = [t for t in tasks if t.name == name] or [t for t in tasks if t.name.rsplit(".", 1)[-1] == name]
    if len(chosen) != 1:
        known = ", ".join(t.name for t in tasks)
        what = "is ambiguous" if chosen else "is not a batched task"
        raise CliError(f"{name!r} {what} of app {spec!r}; its batched tasks: {known}", EXIT_USAGE)
    return chosen


def broker_url(app: Celery) -> str:
    """The app's broker URL, password masked, once Redis has answered; raises ``CliError`` otherwise."""
    connection = app.connection_for_read()
    try:
        url: str = connection.as_uri()  # masks the password
        try:
            require_redis(connection, "batched tasks")
        except BrokerError as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        try:
            # Fail fast: the transport's own default retries for several seconds before giving up.
            connection.ensure_connection(max_retries=1, interval_start=0.2)
        except UNREACHABLE as exc:
            reason = str(exc).replace("\n", " ")
            raise CliError(f"cannot reach Redis at {url} ({reason})", EXIT_REDIS) from exc
        return url
    finally:
        connection.release()


def open_app(spec: str, task: str | None = None) -> tuple[list[Any], str]:
    """Batched tasks of the app (or the one named ``task``) and its reachable broker's masked URL."""
    app = load_app(spec)
    tasks = batched_tasks_of(app, spec, task)
    return tasks, broker_url(app)


#: How ``--task`` names a batched task.
TASK_NAMING = "its full name, or the part after the last dot"


def app_command(commands: Any, name: str, *, help: str, description: str, epilog: str, app_help: str,
                task: bool | None = None, confirm: bool = False) -> argparse.ArgumentParser:
    """A subcommand that loads an app (``-A``); ``--task`` required (``task=True``), optional (``False``) or absent
    (``None``); ``--yes`` when it asks for confirmation."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-A", "--app", required=True, help=app_help)
    if task is not None:
        what = "the batched task" if task else "only this batched task"
        parser.add_argument("--task", required=task, help=f"{what} ({TASK_NAMING})")
    if confirm:
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def confirmed(question: str, refusal: str, yes: bool) -> bool:
    """Go ahead? Yes with ``--yes`` or when the user says so at a terminal; without a terminal to ask on, refuse."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise CliError(f"refusing to {refusal} without --yes: stdin is not a terminal to confirm on", EXIT_USAGE)
    from rich.prompt import Confirm

    if Confirm.ask(question, default=False):
        return True
    print("nothing deleted")
    return False
