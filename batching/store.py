"""The Redis side of a batched queue: claim the oldest messages, wait for more, finish a claim.

Every state change is one Lua script, so a message is always either in its queue, in exactly one consumer's
claim, parked until its ETA, or dead-lettered; the scripts live in ``lua/`` with their contracts in their headers.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from .keys import QueueKeys


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script(resources.files(__package__).joinpath("lua", name).read_text())


@dataclass
class Claim:
    """Messages one consumer took for one batch, under one claim id (its ownership token)."""

    claim_id: str
    raws: list[bytes] = field(default_factory=list)
    #: Unix time of the earliest parked (ETA) message, if any, so the consumer can wake for it.
    next_eta: float | None = None

    def __len__(self) -> int:
        return len(self.raws)


@dataclass
class Finish:
    """What to do with a claim's messages once its results are stored."""

    ran: int = 0
    delayed: list[tuple[float, bytes]] = field(default_factory=list)
    dead: list[tuple[str, bytes]] = field(default_factory=list)


class QueueStore:
    """Claims and finishes batches of one queue through a redis-py client of the app's broker."""

    def __init__(self, client: redis.Redis, keys: QueueKeys, *, lease_s: float = 60.0) -> None:
        self.client = client
        self.keys = keys
        self.lease_s = lease_s
        self._claim = _script(client, "claim.lua")
        self._ack = _script(client, "ack.lua")

    def new_claim(self) -> Claim:
        return Claim(uuid.uuid4().hex)

    def claim(self, into: Claim, count: int) -> int:
        """Move up to ``count`` of the oldest messages into ``into``; return how many were taken."""
        now = time.time()
        k = self.keys
        reply = self._claim(
            keys=[k.claims, k.claim(into.claim_id), k.delayed, *k.lists],
            args=[count, into.claim_id, now + self.lease_s, now],
        )
        into.next_eta = float(reply[0]) if reply[0] else None
        into.raws.extend(reply[1:])
        return len(reply) - 1

    def wait(self, timeout_s: float) -> None:
        """Block until the default list has a message or ``timeout_s`` passes, without taking anything.

        ``BLMOVE list list RIGHT RIGHT`` pops the oldest element and pushes it straight back in the same place: a
        blocking peek. Unlike a blocking pop, nothing is ever out of Redis while we wait, so a consumer killed
        here loses nothing. Redis blocks on one list only; the other priority lists are claimed on every wake-up.
        """
        main = self.keys.main
        # Redis rounds timeouts down to its own resolution; 0 would mean "forever".
        self.client.blmove(main, main, max(timeout_s, 0.001), "RIGHT", "RIGHT")  # type: ignore[arg-type]

    def finish(self, claim: Claim, outcome: Finish) -> bool:
        """Drop the claim, parking ETA messages and dead letters in the same atomic step."""
        k = self.keys
        args: list[Any] = [claim.claim_id, outcome.ran, len(outcome.delayed)]
        for eta, raw in outcome.delayed:
            args += [eta, raw]
        for reason, raw in outcome.dead:
            args.append(dead_letter(k.queue, reason, raw))
        removed = self._ack(keys=[k.claims, k.claim(claim.claim_id), k.delayed, k.dead, k.stats], args=args)
        return bool(removed)

    def batch_sizes(self) -> dict[int, int]:
        """Histogram of batch sizes run so far on this queue (all consumers)."""
        stats: dict[bytes, bytes] = self.client.hgetall(self.keys.stats)  # type: ignore[assignment]
        return {int(k[5:]): int(v) for k, v in stats.items() if k.startswith(b"size:")}


def dead_letter(queue: str, reason: str, raw: bytes) -> str:
    """A dead-letter entry: JSON that keeps the raw message as text whatever bytes it held."""
    return json.dumps(
        {"queue": queue, "reason": reason, "at": time.time(), "raw": raw.decode("utf-8", "backslashreplace")}
    )
