"""Every Redis key the batching consumer reads or writes, built in one place.

Queue lists are kombu's own (the consumer must read exactly what ``.delay()`` wrote): ``<prefix><queue>`` for the
default priority and ``<prefix><queue><sep><step>`` for the other ``priority_steps``. The consumer's own state lives
under ``<prefix>batching:`` so that one ``global_keyprefix`` isolates several apps sharing a Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: kombu's defaults, used when the transport does not say otherwise.
DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
NAMESPACE = "batching"


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one batched task's queue."""

    queue: str
    prefix: str = ""
    sep: str = DEFAULT_SEP
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS

    @property
    def lists(self) -> list[str]:
        """The queue's lists, highest priority first (on Redis, lower numbers are served first)."""
        out = []
        for step in sorted(set(self.priority_steps)):
            out.append(f"{self.prefix}{self.queue}{self.sep}{step}" if step else f"{self.prefix}{self.queue}")
        if f"{self.prefix}{self.queue}" not in out:  # kombu maps priority 0 to the bare name even without step 0
            out.insert(0, f"{self.prefix}{self.queue}")
        return out

    @property
    def main(self) -> str:
        """The default-priority list: where ``.delay()`` without a priority pushes."""
        return f"{self.prefix}{self.queue}"

    def _own(self, kind: str) -> str:
        return f"{self.prefix}{NAMESPACE}:{kind}:{self.queue}"

    @property
    def claims(self) -> str:
        """Sorted set: claim id -> lease deadline (unix seconds); a claim past it belongs to a dead consumer."""
        return self._own("claims")

    def claim(self, claim_id: str) -> str:
        """List of ``source list, raw message`` pairs that one consumer took for one batch."""
        return f"{self._own('claim')}:{claim_id}"

    @property
    def delayed(self) -> str:
        """Sorted set: raw message -> ETA (unix seconds), for countdown/eta tasks not yet due."""
        return self._own("delayed")

    @property
    def dead(self) -> str:
        """List of dead letters: JSON ``{reason, raw}`` for messages that can never become a task."""
        return self._own("dead")

    @property
    def deliveries(self) -> str:
        """Hash: sha1 of a raw message -> deliveries that never finished (exists only after a crash)."""
        return self._own("deliveries")

    @property
    def consumers(self) -> str:
        """Sorted set: consumer id -> last heartbeat (unix seconds), for status and liveness."""
        return self._own("consumers")

    @property
    def stats(self) -> str:
        """Hash of counters: ``size:<n>`` batches of n requests run, ``requests`` in all."""
        return self._own("stats")
