"""A batch as it moves through a consumer's threads, and who writes what in it.

- The fetch thread builds it: the claim (``claim``), the requests to run (``items``), the outcomes decided without
  running (``settled``: bad, revoked, expired messages) and what finishing the claim involves (``finish``).
- The model thread, or the hard-time-limit timer if it fires first, gives every item its ``outcome``, once, and
  hands the batch on (``ModelRunner``).
- The keeper thread reads the outcomes (``outcomes()``), stores them and finishes the claim.

Hand-overs go through a lock or a queue, so each field has one writer at a time.
"""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass, field
from typing import Any

from celery import states

from ..store.queue import Claim, Finish
from .request import TaskRequest


@dataclass(slots=True)
class Outcome:
    """The final state of one task: ``value`` is the result, or the exception for FAILURE/REVOKED/RETRY."""

    task_id: str
    state: str
    value: Any
    request: TaskRequest | None = None
    traceback: str | None = None

    @classmethod
    def of(cls, task_id: str, result: Any, request: TaskRequest | None = None) -> Outcome:
        """SUCCESS with ``result``, or FAILURE if ``result`` is an exception (the batch contract)."""
        if isinstance(result, Exception):
            return cls(task_id, states.FAILURE, result, request, format_traceback(result, returned=True))
        return cls(task_id, states.SUCCESS, result, request)

    @classmethod
    def failure(cls, task_id: str, exc: BaseException, request: TaskRequest | None = None) -> Outcome:
        return cls(task_id, states.FAILURE, exc, request, format_traceback(exc))


#: What stands for the frames in the traceback of an exception that was never raised: one that ``run_batch``
#: returned as a request's result, or one the consumer reports itself (a bad message, a hard time limit). A bare
#: "ValueError: ..." would read like a truncated traceback.
RETURNED = "  (no frames: run_batch returned this exception as the request's result, it was not raised)\n"
REPORTED = "  (no frames: the batching consumer reported this error, it was not raised in the task)\n"


def format_traceback(exc: BaseException, returned: bool = False) -> str:
    """The traceback text Celery stores with a FAILURE: the frames if it was raised, its type and message always."""
    if exc.__traceback__ is not None:
        return "".join(tb.format_exception(exc))
    return ("Traceback (most recent call last):\n" + (RETURNED if returned else REPORTED)
            + "".join(tb.format_exception_only(exc)))


@dataclass(slots=True)
class Planned:
    """What packing a batch by cost knows of one claimed request (tasks with ``cost=`` only)."""

    raw: bytes
    cost: float
    #: When this consumer claimed it (monotonic seconds): bucketing holds nothing back past ``max_delay``.
    seen_at: float


@dataclass(slots=True)
class Item:
    """One request of a batch that goes to the model, and, once the batch has run, its outcome."""

    request: TaskRequest
    outcome: Outcome | None = None
    #: Set for tasks with ``cost=`` only, so others carry nothing more per item.
    planned: Planned | None = None


@dataclass
class Batch:
    """A claim, triaged: the requests to run, the outcomes already decided, and how to finish the claim."""

    claim: Claim
    items: list[Item] = field(default_factory=list)
    settled: list[Outcome] = field(default_factory=list)
    finish: Finish = field(default_factory=Finish)
    #: Why the batch stopped forming (``policy.FLUSH_REASONS``): set by the fetch thread, where the flush policy, a
    #: top-up that filled it or a stop request ended it; a reason set while topping up (the cost budget) stands.
    flush_reason: str = ""
    #: Unix times: first message claimed, and run_batch started (None: nothing ran).
    claimed_at: float = 0.0
    started_at: float | None = None
    #: The items as registered in Celery's worker state for inspect and revoke (``control.ItemRequest``).
    tracked: list[Any] = field(default_factory=list)
    #: What observability hooks keep between running the batch and settling it (``signals.TaskSignals``); None
    #: when nothing listens, so an unobserved batch carries nothing per item.
    observed: Any = None
    #: ``coalescing.Coalesced`` of a task with ``coalesce=True`` (its requests' keys, the computations it owns);
    #: None otherwise, so a batch of any other task carries and checks nothing per item.
    coalesced: Any = None

    def outcomes(self) -> list[Outcome]:
        """Every outcome of the batch: those decided without running, then the items' in request order."""
        ran = [item.outcome for item in self.items if item.outcome is not None]
        return self.settled + ran if self.settled else ran
