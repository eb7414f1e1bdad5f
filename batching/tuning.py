"""Live tuning: ``celery -A app control batching_set --task NAME batch_size=64 max_delay=0.005``.

A Celery remote-control command, so it reaches every worker through Celery's own broadcast, and each worker
answers for itself. It changes how a batched task's consumer forms batches — ``batch_size``, ``max_delay`` and,
for a task with a cost budget, ``max_batch_cost`` — without a restart: the new values are checked by the same
checks ``@batched`` runs (``FlushPolicy``, ``BatchSettings``) on a copy of the consumer's settings, which then
replaces the old one in a single reference swap; the next batch forms under them. A refused change (unknown key
or task, a value out of range or of the wrong type) changes nothing and says why in the command's reply.

Celery's CLI checks a control command's name against its registry in its own process, and its parser knows no
``--task`` option: ``install`` registers the command (in the worker and in ``celery`` CLI processes, which
import this when the app's module defines batched tasks) and teaches ``celery control`` ``--task``, for this
command only. The worker side, which holds the consumers, is found through the worker's bootsteps
(``batching_retune``), so this module never imports the worker.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .cost import CostSpec
from .errors import ConfigurationError
from .settings import BatchSettings

logger = logging.getLogger(__name__)

#: The remote-control command's name.
COMMAND = "batching_set"
#: What it may change, and how a value given on the command line is read.
TUNABLE: dict[str, type] = {"batch_size": int, "max_delay": float, "max_batch_cost": float}
SIGNATURE = "--task NAME key=value [key=value ...]"
HELP = f"Change a batched task's {', '.join(TUNABLE)} on the workers, live"


def values(settings: BatchSettings) -> dict[str, Any]:
    """The values ``batching_set`` can change, as ``settings`` has them (``max_batch_cost`` when it exists)."""
    out: dict[str, Any] = {"batch_size": settings.policy.batch_size, "max_delay": settings.policy.max_delay_s}
    if settings.cost is not None:
        out["max_batch_cost"] = settings.cost.max_batch_cost
    return out


def parse(settings: Sequence[str] | Mapping[str, Any] | None, task: str | None = None) -> tuple[str, dict[str, Any]]:
    """The task name and the changes asked for: ``key=value`` strings (``task=NAME`` among them, as the CLI sends
    ``--task``) or a mapping; raises ``ConfigurationError`` saying what is wrong."""
    changes: dict[str, Any] = {}
    if isinstance(settings, Mapping):
        changes.update(settings)
    else:
        for item in settings or ():
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise ConfigurationError(f"expected key=value, got {item!r}")
            changes[key.strip()] = value.strip()
    task = changes.pop("task", None) or task
    if not task:
        raise ConfigurationError(f"name the batched task: {COMMAND} {SIGNATURE}")
    unknown = sorted(set(changes) - set(TUNABLE))
    if unknown:
        raise ConfigurationError(f"cannot change {', '.join(map(repr, unknown))}: {COMMAND} changes "
                                 f"{', '.join(TUNABLE)}")
    if not changes:
        raise ConfigurationError(f"nothing to change: give at least one of {', '.join(TUNABLE)} as key=value")
    return str(task), {key: _read(key, value) for key, value in changes.items()}


def _read(key: str, value: Any) -> Any:
    """A value from the command line as its type (a number given as a number is kept as it is)."""
    if not isinstance(value, str):
        return value
    kind = TUNABLE[key]
    try:
        return kind(value) if kind is int else _number(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigurationError(f"{key} must be {what}, got {value!r}") from None


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def retuned(settings: BatchSettings, changes: Mapping[str, Any]) -> BatchSettings:
    """``settings`` with ``changes`` applied, through the checks ``@batched`` runs; ``ConfigurationError`` if any
    fails (the settings given are left as they are: they are frozen)."""
    policy = settings.policy
    if "batch_size" in changes or "max_delay" in changes:
        policy = dataclasses.replace(policy, batch_size=changes.get("batch_size", policy.batch_size),
                                     max_delay_s=changes.get("max_delay", policy.max_delay_s))
    cost = settings.cost
    if "max_batch_cost" in changes:
        if cost is None:
            raise ConfigurationError(f"max_batch_cost: {settings.name} has no cost= function to budget with")
        # Through the checks @batched runs (CostSpec.build), on the task's own cost function.
        cost = CostSpec.build(settings.name, cost.fn, cost.spec, max_batch_cost=changes["max_batch_cost"],
                              padded=cost.padded, bucket=cost.bucket, max_delay_s=policy.max_delay_s)
    elif cost is not None and cost.bucket:
        CostSpec.build(settings.name, cost.fn, cost.spec, max_batch_cost=cost.max_batch_cost, padded=cost.padded,
                       bucket=True, max_delay_s=policy.max_delay_s)  # bucketing needs max_delay > 0 still
    return dataclasses.replace(settings, policy=policy, cost=cost)


def describe(settings: BatchSettings) -> str:
    return " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in values(settings).items())


def encode(settings: BatchSettings) -> str:
    """The values as a consumer reports them to ``batching status`` (JSON)."""
    return json.dumps(values(settings), separators=(",", ":"))


def batching_set(state: Any, settings: Any = None, task: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Change a batched task's batch_size, max_delay or max_batch_cost on this worker (the control command)."""
    try:
        name, changes = parse(settings, task)
        before, after = _worker_hook(state)(name, changes)
    except ConfigurationError as exc:
        logger.warning("batching: %s refused: %s", COMMAND, exc)
        return {"error": f"refused, nothing changed: {exc}"}
    return {"ok": f"{name}: {describe(after)} (was {describe(before)})"}


def _worker_hook(state: Any) -> Any:
    """The worker's ``batching_retune(name, changes) -> (settings before, settings after)``: its batching
    bootstep's."""
    controller = getattr(getattr(state, "consumer", None), "controller", None)
    for step in getattr(controller, "steps", None) or ():
        hook = getattr(step, "batching_retune", None)
        if hook is not None:
            return hook
    raise ConfigurationError("this worker runs no batched tasks")


def install() -> None:
    """Register ``batching_set`` with Celery's remote control, and ``--task`` with ``celery control`` when the
    ``celery`` command runs in this process. Idempotent."""
    from celery.worker.control import Panel, control_command

    if COMMAND not in Panel.data:
        control_command(name=COMMAND, variadic="settings", signature=SIGNATURE, help=HELP)(batching_set)
    if "celery.bin.control" in sys.modules:
        _accept_task_option(sys.modules["celery.bin.control"].control)


def _accept_task_option(command: Any) -> None:
    """``celery control COMMAND --task NAME ...``: Celery's parser refuses options it does not know, so ``--task``
    becomes one of ``celery control``'s, handed on as the first ``task=NAME`` argument of ``batching_set`` and
    refused for any other command. The rejected alternative, letting ``celery control`` pass unknown options
    through, would also pass a misspelt ``--destination`` through and send a command to every worker."""
    import click

    if any(param.name == "task" for param in command.params):
        return
    command.params.append(click.Option(["--task"], help=f"{COMMAND} only: the batched task to change"))
    original = command.callback

    @functools.wraps(original)
    def callback(*args: Any, task: str | None = None, **kwargs: Any) -> Any:
        if task is not None:
            ctx = click.get_current_context()
            if ctx.params.get("command") != COMMAND:
                raise click.UsageError(f"--task is an option of {COMMAND} only")
            ctx.args = [f"task={task}", *ctx.args]
        return original(*args, **kwargs)

    command.callback = callback
