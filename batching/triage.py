"""Claimed messages -> what happens to each: run it, park it until its ETA, or settle it without running.

Pure decisions over decoded messages (the revoked set and the clock are passed in), so every rule is unit-tested
without Redis: undecodable messages fail (task id readable) or are dead-lettered (not), messages for another
task fail, expired and revoked ones are REVOKED, future ETAs are parked, everything else joins the batch.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Container
from dataclasses import dataclass, field
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError

from .codec import Request, Undecodable, decode
from .errors import MessageError
from .results import Outcome
from .store import Claim, Finish

#: Where a too-large message's task id can still be read without parsing it: kombu writes ``properties`` (with
#: ``correlation_id``, the task id) after the body, so the tail of the envelope holds it.
_CORRELATION_ID = re.compile(rb'"correlation_id":\s*"([0-9A-Za-z_.:-]{1,200})"')
_TAIL_BYTES = 8192


@dataclass
class Rules:
    """What one batched task accepts."""

    task_name: str
    queue: str
    accept: Collection[str]
    max_message_bytes: int
    hostname: str = ""
    ignore_result: bool = False


@dataclass
class Batch:
    """A claim, triaged: the requests to run, the outcomes already decided, and how to finish the claim."""

    claim: Claim
    runnable: list[Request] = field(default_factory=list)
    contexts: list[TaskRequest] = field(default_factory=list)
    settled: list[Outcome] = field(default_factory=list)
    finish: Finish = field(default_factory=Finish)
    #: Unix times: first message claimed, and run_batch started (None: nothing ran).
    claimed_at: float = 0.0
    started_at: float | None = None


def triage(batch: Batch, raws: list[bytes], rules: Rules, revoked: Container[str], now: float) -> None:
    """Sort newly claimed ``raws`` into ``batch``."""
    if not batch.claimed_at:
        batch.claimed_at = now
    for raw in raws:
        item = _decode(raw, rules)
        if isinstance(item, Undecodable):
            if item.task_id is not None:
                batch.settled.append(Outcome.failure(item.task_id, item.error))
            else:
                batch.finish.dead.append((str(item.error), raw))
            continue
        context = request_context(item, rules)
        if item.task != rules.task_name:
            error = MessageError(
                f"task {item.task!r} was sent to the batch queue {rules.queue!r}, which only serves {rules.task_name!r}"
            )
            batch.settled.append(Outcome.failure(item.id, error, context))
        elif item.id in revoked:
            batch.settled.append(Outcome(item.id, states.REVOKED, TaskRevokedError("revoked"), context))
        elif item.expires is not None and item.expires <= now:
            batch.settled.append(Outcome(item.id, states.REVOKED, TaskRevokedError("expired"), context))
        elif item.eta is not None and item.eta > now:
            batch.finish.delayed.append((item.eta, raw))
        else:
            batch.runnable.append(item)
            batch.contexts.append(context)


def _decode(raw: bytes, rules: Rules) -> Request | Undecodable:
    if len(raw) > rules.max_message_bytes:
        error = MessageError(
            f"message of {len(raw):,} bytes is over this task's limit of {rules.max_message_bytes:,} bytes "
            "(max_message_bytes); it was not decoded"
        )
        found = _CORRELATION_ID.search(raw[-_TAIL_BYTES:])
        return Undecodable(error, found.group(1).decode() if found else None)
    return decode(raw, rules.accept)


@dataclass(slots=True)
class TaskRequest:
    """The task request as Celery's tracer and result backend read it (``Task.request``'s fields that matter).

    A slotted record rather than ``celery.app.task.Context``, whose constructor costs more than the rest of a
    request's bookkeeping together; the backend helpers only read these attributes.
    """

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    hostname: str
    delivery_info: dict[str, Any]
    ignore_result: bool = False
    group: str | None = None
    group_index: int | None = None
    parent_id: str | None = None
    root_id: str | None = None
    retries: int = 0
    timelimit: Any = None
    callbacks: Any = None
    errbacks: Any = None
    chain: Any = None
    chord: Any = None
    reply_to: str | None = None
    correlation_id: str | None = None
    children: list[Any] = field(default_factory=list)
    stamps: dict[str, Any] | None = None
    stamped_headers: list[str] | None = None
    called_directly: bool = False
    is_eager: bool = False
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    eta: str | None = None
    expires: str | None = None
    #: Unix time the client sent the message (``sent_at`` header of this library's clients), for queue-wait stats.
    sent_at: float | None = None


def request_context(request: Request, rules: Rules) -> TaskRequest:
    """The task request as Celery's tracer would see it (result metadata, result_extended, chords, callbacks)."""
    h = request.headers
    embed: dict[str, Any] = request.embed
    props = request.properties
    return TaskRequest(
        id=request.id,
        task=request.task,
        args=request.args,
        kwargs=request.kwargs,
        hostname=rules.hostname,
        delivery_info={"routing_key": rules.queue},
        ignore_result=bool(h.get("ignore_result")) or rules.ignore_result,
        group=h.get("group"),
        group_index=h.get("group_index"),
        parent_id=h.get("parent_id"),
        root_id=h.get("root_id"),
        retries=h.get("retries") or 0,
        timelimit=_timelimit(h.get("timelimit")),
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
        reply_to=props.get("reply_to"),
        correlation_id=props.get("correlation_id"),
        argsrepr=h.get("argsrepr"),
        kwargsrepr=h.get("kwargsrepr"),
        eta=h.get("eta"),
        expires=h.get("expires"),
        sent_at=h.get("sent_at") if isinstance(h.get("sent_at"), (int, float)) else None,
    )


def _timelimit(value: Any) -> list[float | None] | None:
    """A request's ``[hard, soft]`` time limits, keeping only numbers of seconds a timer can actually wait.

    Headers are untrusted input: ``Infinity``, ``NaN`` or ``1e300`` would kill the watchdog's timer thread with an
    ``OverflowError``, leaving the batch with no limit and an unhandled thread exception; such a limit is no limit.
    """
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    return [
        float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= threading.TIMEOUT_MAX else None
        for v in value
    ]
