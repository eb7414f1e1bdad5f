"""``coalesce=True`` in the consumer: identical requests in flight at once run once, and every caller is answered.

- Fetch thread (``join``): each request just claimed gets its coalescing key (``batching.coalesce``). A key
  already in this batch is merged locally; a key computed by another live claim (this worker's or another's) moves
  the message into that claim, through Redis (``store.coalesce``): it leaves this batch and is answered there.
- Model thread: the runner calls ``run_batch`` on the distinct inputs only and fans the results back out.
- Keeper thread (``answers`` then ``followers``): after the batch ran, the claim stops taking followers, and each
  follower gets the outcome of its key — same value or same error, stored under its own task id with its own
  events, callbacks and signals — before the claim is finished. A follower whose key has no outcome here (its owner
  was revoked before the batch started) goes back to the queue, where it is computed anew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from celery import states
from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state

from ..coalesce import request_key
from ..codec import Request, decode, task_id_of
from ..store.coalesce import CoalesceStore
from .batch import Batch, Outcome
from .request import TaskRequest

if TYPE_CHECKING:
    from ..settings import BatchSettings
    from ..store.queue import QueueStore
    from .triage import Rules


@dataclass
class Coalesced:
    """What a batch knows about its coalesced requests (``Batch.coalesced``)."""

    #: Task id -> coalescing key, for the batch's requests that have one.
    keys: dict[str, str] = field(default_factory=dict)
    #: Keys whose computation this batch's claim owns in Redis (followers may join them).
    owned: set[str] = field(default_factory=set)


class Coalescer:
    """Coalesces the requests of one batched task's consumer."""

    def __init__(self, settings: BatchSettings, store: QueueStore, rules: Rules) -> None:
        self.settings = settings
        self.rules = rules
        self.redis = CoalesceStore(store)

    def key(self, request: TaskRequest | Request) -> str | None:
        return request_key(self.settings.name, self.settings.spec, request.args, request.kwargs)

    # -- fetch thread ------------------------------------------------------------------------------------------

    def join(self, batch: Batch, raws: list[bytes], first: int) -> None:
        """Key the items ``batch.items[first:]`` (triaged from ``raws``, just claimed) and hand those that another
        live claim already computes over to it: they leave this batch and its claim."""
        coalesced = batch.coalesced
        if coalesced is None:
            coalesced = batch.coalesced = Coalesced()
        pending: dict[str, str] = {}  # task id -> key, for keys this claim does not own yet
        for item in batch.items[first:]:
            key = self.key(item.request)
            if key is None:
                continue
            coalesced.keys[item.request.id] = key
            if key not in coalesced.owned:
                pending[item.request.id] = key
        if not pending or batch.claim.redelivered:
            # A claim of messages whose batch died with its consumer is never joined with others, nor others with
            # it: poison isolation halves such a group until a killer dies alone, which followers moving in would
            # defeat. Its identical requests are still merged within it.
            return
        # Every request of a key new to this claim is asked about (in claim order), not only the first: if the key
        # is computed elsewhere, all of them move there; if not, the first makes this claim the owner and the others
        # stay as local duplicates.
        by_id = {task_id_of(raw, self.rules.accept): raw for raw in raws}
        asked = [(task_id, key, by_id[task_id]) for task_id, key in pending.items() if task_id in by_id]
        owned = self.redis.join(batch.claim, [(key, raw) for _id, key, raw in asked])
        gone: set[str] = set()
        for (task_id, key, raw), ours in zip(asked, owned, strict=True):
            if ours:
                coalesced.owned.add(key)
            else:
                gone.add(task_id)
                coalesced.keys.pop(task_id, None)
                batch.claim.raws.remove(raw)
        if gone:
            batch.items[first:] = [item for item in batch.items[first:] if item.request.id not in gone]

    # -- keeper thread -----------------------------------------------------------------------------------------

    @staticmethod
    def answers(batch: Batch) -> dict[str, Outcome]:
        """Key -> the outcome computed for it, taken before terminated items' outcomes are dropped: a caller's
        revoke drops its own result, never the computation its followers wait for."""
        coalesced = batch.coalesced
        if coalesced is None:
            return {}
        found: dict[str, Outcome] = {}
        for item in batch.items:
            key = coalesced.keys.get(item.request.id)
            if key is not None and item.outcome is not None and key not in found:
                found[key] = item.outcome
        return found

    def followers(self, batch: Batch, answers: dict[str, Outcome]) -> list[Outcome]:
        """Close the batch's computations and return its followers' outcomes; followers without an answer are
        put in ``batch.finish`` to go back to the queue as the claim is finished."""
        coalesced = batch.coalesced
        if coalesced is None or not coalesced.owned:
            return []
        held = self.redis.close(batch.claim, sorted(coalesced.owned))
        own = set(batch.claim.raws)
        rules = self.rules
        out: list[Outcome] = []
        for raw in held:
            if raw in own:
                continue
            request = decode(raw, rules.accept, rules.max_message_bytes)
            key = self.key(request) if isinstance(request, Request) else None
            answer = answers.get(key) if key is not None else None
            if answer is None or not isinstance(request, Request):
                batch.finish.delayed.append((0.0, raw))  # due at once: back to the front of the queue
                continue
            task_request = TaskRequest(request, rules.hostname, rules.queue, rules.ignore_result)
            if request.id in worker_state.revoked:
                out.append(Outcome(request.id, states.REVOKED, TaskRevokedError("revoked"), task_request))
            else:
                out.append(Outcome(request.id, answer.state, answer.value, task_request, answer.traceback))
        return out
