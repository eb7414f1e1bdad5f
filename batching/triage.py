"""Claimed messages -> what happens to each: run it, park it until its ETA, or settle it without running.

Pure decisions over decoded messages (the revoked set and the clock are passed in), so every rule is unit-tested
without Redis: undecodable messages fail (task id readable) or are dead-lettered (not), messages for another
task fail, expired and revoked ones are REVOKED, future ETAs are parked, everything else joins the batch.
"""

from __future__ import annotations

import re
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


class TaskRequest:
    """The task request as Celery's tracer and result backend read it (``Task.request``'s fields that matter).

    Not ``celery.app.task.Context``, whose constructor costs more than the rest of a request's bookkeeping
    together: a few slots are filled per message and everything else is read from the message's headers when (and
    only if) a backend helper, a chord, a callback or an event asks for it.
    """

    __slots__ = ("_embed", "_headers", "_props", "args", "children", "delivery_info", "hostname", "id",
                 "ignore_result", "kwargs", "task")
    called_directly = False
    is_eager = False
    stamps: dict[str, Any] | None = None
    stamped_headers: list[str] | None = None

    def __init__(self, request: Request, rules: Rules) -> None:
        self.id = request.id
        self.task = request.task
        self.args = request.args
        self.kwargs = request.kwargs
        self.hostname = rules.hostname
        self.delivery_info = {"routing_key": rules.queue}
        self._headers = request.headers
        self._props = request.properties
        self._embed = request.embed
        self.ignore_result = bool(request.headers.get("ignore_result")) or rules.ignore_result
        self.children: list[Any] = []

    group = property(lambda self: self._headers.get("group"))
    group_index = property(lambda self: self._headers.get("group_index"))
    parent_id = property(lambda self: self._headers.get("parent_id"))
    root_id = property(lambda self: self._headers.get("root_id"))
    retries = property(lambda self: self._headers.get("retries") or 0)
    timelimit = property(lambda self: self._headers.get("timelimit"))
    argsrepr = property(lambda self: self._headers.get("argsrepr"))
    kwargsrepr = property(lambda self: self._headers.get("kwargsrepr"))
    eta = property(lambda self: self._headers.get("eta"))
    expires = property(lambda self: self._headers.get("expires"))
    callbacks = property(lambda self: self._embed.get("callbacks"))
    errbacks = property(lambda self: self._embed.get("errbacks"))
    chain = property(lambda self: self._embed.get("chain"))
    chord = property(lambda self: self._embed.get("chord"))
    reply_to = property(lambda self: self._props.get("reply_to"))
    correlation_id = property(lambda self: self._props.get("correlation_id"))

    @property
    def sent_at(self) -> float | None:
        """Unix time the client sent the message (``sent_at`` header of this library's clients)."""
        value = self._headers.get("sent_at")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def request_context(request: Request, rules: Rules) -> TaskRequest:
    return TaskRequest(request, rules)
