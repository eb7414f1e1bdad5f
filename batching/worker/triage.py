"""Claimed messages -> what happens to each: run it, park it until its ETA, or settle it without running.

Pure decisions over decoded messages (the revoked set and the clock are passed in), so every rule is unit-tested
without Redis: undecodable messages fail (task id readable) or are dead-lettered (not), messages for another
task fail, expired and revoked ones are REVOKED (so are those whose caller gave up waiting: ``RequestAbandoned``),
future ETAs are parked, everything else joins the batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass

from celery import states
from celery.exceptions import TaskRevokedError

from ..codec import Request, Undecodable, decode
from ..cost import COST_HEADER, CostSpec
from ..errors import CostError, MessageError, MissingArgumentError, RequestAbandoned, UnexpectedArgumentError
from .batch import Batch, Item, Outcome, Planned
from .request import TaskRequest

#: Where a too-large message's task id can still be read without parsing it: kombu writes ``properties`` (with
#: ``correlation_id``, the task id) last, after the body and the headers, so the tail of the envelope holds it —
#: the *last* match, since a header of the same name may come before it.
_CORRELATION_ID = re.compile(rb'"correlation_id":\s*"([0-9A-Za-z_.:-]{1,200})"')
_TAIL_BYTES = 8192
#: The stored reason of a request whose caller stopped waiting before a consumer claimed it.
ABANDONED = "abandoned: its caller stopped waiting (timed out or cancelled) before it was claimed; it never ran"


@dataclass(frozen=True)
class Rules:
    """What one batched task accepts, and what its requests carry from the worker."""

    task_name: str
    queue: str
    accept: Collection[str]
    max_message_bytes: int
    hostname: str = ""
    ignore_result: bool = False
    #: The task's cost settings: each request to run gets its cost (``Item.planned``); None: nothing is computed.
    cost: CostSpec | None = None


def triage(
    batch: Batch, raws: list[bytes], rules: Rules, revoked: Container[str], now: float,
    abandoned: Callable[[list[str]], Container[str]] | None = None, seen_at: float = 0.0,
) -> None:
    """Sort newly claimed ``raws`` into ``batch``.

    ``abandoned``, given only when some caller of the queue gave up lately, looks the claimed ids up at once.
    ``seen_at`` (monotonic seconds) is when they were claimed, for packing by cost.
    """
    if not batch.claimed_at:
        batch.claimed_at = now
    decoded = [_decode(raw, rules) for raw in raws]
    gave_up: Container[str] = ()
    if abandoned is not None:
        gave_up = abandoned([d.id for d in decoded if not isinstance(d, Undecodable)])
    for raw, item in zip(raws, decoded, strict=True):
        if isinstance(item, Undecodable):
            if item.task_id is not None:
                batch.settled.append(Outcome.failure(item.task_id, item.error))
            else:
                batch.finish.dead.append((str(item.error), raw))
            continue
        request = TaskRequest(item, rules.hostname, rules.queue, rules.ignore_result)
        if item.task != rules.task_name:
            error = MessageError(
                f"task {item.task!r} was sent to the batch queue {rules.queue!r}, which only serves {rules.task_name!r}"
            )
            batch.settled.append(Outcome.failure(item.id, error, request))
        elif item.id in revoked:
            batch.settled.append(Outcome(item.id, states.REVOKED, TaskRevokedError("revoked"), request))
        elif item.id in gave_up:
            batch.settled.append(Outcome(item.id, states.REVOKED, RequestAbandoned(ABANDONED), request))
        elif item.expires is not None and item.expires <= now:
            batch.settled.append(Outcome(item.id, states.REVOKED, TaskRevokedError("expired"), request))
        elif item.eta is not None and item.eta > now:
            batch.finish.delayed.append((item.eta, raw))
        elif rules.cost is None:
            batch.items.append(Item(request))
        elif isinstance(planned := _planned(item, raw, rules.cost, seen_at), CostError):
            # Settled at once, never given back: a request no batch can hold would otherwise come round forever.
            batch.settled.append(Outcome.failure(item.id, planned, request))
        else:
            batch.items.append(Item(request, planned=planned))


def _planned(item: Request, raw: bytes, cost: CostSpec, seen_at: float) -> Planned | CostError:
    """The request's cost: the client's (its header), or, for a message sent by name without one, computed here."""
    value = item.headers.get(COST_HEADER)
    try:
        if value is not None:
            return Planned(raw, cost.check(value), seen_at)
        try:
            bound = cost.spec.bind(item.args, item.kwargs)
        except (MissingArgumentError, UnexpectedArgumentError):
            return Planned(raw, 0.0, seen_at)  # the merge fails it alone, with that error
        return Planned(raw, cost.of(bound), seen_at)
    except CostError as exc:
        return exc


def _decode(raw: bytes, rules: Rules) -> Request | Undecodable:
    if len(raw) > rules.max_message_bytes:
        error = MessageError(
            f"message of {len(raw):,} bytes is over this task's limit of {rules.max_message_bytes:,} bytes "
            "(max_message_bytes); it was not decoded"
        )
        found = _CORRELATION_ID.findall(raw[-_TAIL_BYTES:])
        return Undecodable(error, found[-1].decode() if found else None)
    return decode(raw, rules.accept, rules.max_message_bytes)
