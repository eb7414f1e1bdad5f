"""Dead letters: messages that can never become a finished task, kept with the reason so nothing is lost silently.

A message is dead-lettered when it cannot be decoded far enough to read its task id (so no FAILURE can be stored
for it), or when it was delivered ``max_deliveries`` times and every consumer that took it died before finishing
(then its task is also marked FAILURE). Entries are JSON ``{queue, reason, at, raw[, deliveries]}``, newest first.

From Python::

    from batching import list_dead, requeue_dead, purge_dead
    for letter in list_dead(predict):
        print(letter.reason)
    requeue_dead(predict)          # all of them back into the queue, as new messages
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..codec import task_id_of
from ..store.queue import QueueStore


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    reason: str
    at: float
    raw: bytes
    deliveries: int | None
    #: The entry exactly as stored, which identifies it for re-queuing.
    entry: bytes

    @classmethod
    def parse(cls, entry: bytes) -> DeadLetter:
        """Read a stored entry; never raises.

        An entry that is not ours (not a JSON object with a text ``raw``) comes back whole as ``raw``, with the
        reason "unreadable dead-letter entry", so one stray entry cannot break listing or re-queuing the others.
        """
        try:
            data = json.loads(entry.decode("utf-8", "surrogateescape"))
            raw = data["raw"].encode("utf-8", "surrogateescape")  # the exact bytes, however invalid as UTF-8
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls("?", "unreadable dead-letter entry", 0.0, entry, None, entry)
        at, deliveries = data.get("at"), data.get("deliveries")
        return cls(
            queue=str(data.get("queue", "?")),
            reason=str(data.get("reason", "")),
            at=float(at) if isinstance(at, (int, float)) else 0.0,
            raw=raw,
            deliveries=deliveries if isinstance(deliveries, int) else None,
            entry=entry,
        )

    @property
    def task_id(self) -> str | None:
        """The task id, if the message can be read that far (JSON only: a dead letter is never unpickled)."""
        return task_id_of(self.raw, {"application/json"})


def _store(task: Any) -> tuple[QueueStore, Any]:
    return QueueStore.open(task.app, task.batching)


def list_dead(task: Any, limit: int = 100) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of a batched task's queue."""
    if limit <= 0:
        return []  # LRANGE 0 -1 would mean "all of them"
    store, connection = _store(task)
    try:
        return [DeadLetter.parse(e) for e in store.dead_letters(0, limit - 1)]
    finally:
        connection.release()


def requeue_dead(task: Any, letters: Iterable[DeadLetter] | None = None) -> int:
    """Put dead letters (default: all) back into the task's queue as new messages; returns how many moved."""
    store, connection = _store(task)
    try:
        chosen = list(letters) if letters is not None else [DeadLetter.parse(e) for e in store.dead_letters()]
        return store.requeue_dead((letter.entry, letter.raw) for letter in chosen)
    finally:
        connection.release()


def purge_dead(task: Any) -> int:
    """Delete every dead letter of the task's queue; returns how many there were."""
    store, connection = _store(task)
    try:
        return store.purge_dead()
    finally:
        connection.release()
