"""Every Redis key the batching consumer reads or writes, built in one place.

Queue lists are kombu's own (the consumer must read exactly what ``.delay()`` wrote): ``<prefix><queue>`` for the
default priority and ``<prefix><queue><sep><step>`` for the other ``priority_steps``. The consumer's own state lives
under ``<prefix>batching:`` so that one ``global_keyprefix`` isolates several apps sharing a Redis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: kombu's defaults, used when the transport does not say otherwise.
DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
NAMESPACE = "batching"
#: Flush reasons are counted per batch in one hash per minute (``flushes``); ``batching status`` sums the last
#: ``FLUSH_WINDOW_BUCKETS`` of them, and each expires once it has left that window.
FLUSH_BUCKET_S = 60
FLUSH_WINDOW_BUCKETS = 5


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

    #: Sorted set: claim id -> lease deadline (unix seconds); a claim past it belongs to a dead consumer.
    claims: str = field(init=False)
    #: Sorted set: raw message -> ETA (unix seconds), for countdown/eta tasks not yet due.
    delayed: str = field(init=False)
    #: List of dead letters: JSON ``{queue, reason, at, raw[, deliveries]}`` for messages that can never finish.
    dead: str = field(init=False)
    #: Hash: sha1 of a raw message -> deliveries that never finished (exists only after a crash).
    deliveries: str = field(init=False)
    #: Sorted set: consumer id -> last heartbeat (unix seconds), for status and liveness.
    consumers: str = field(init=False)
    #: Hash of counters: ``size:<n>`` batches of n requests run, ``requests`` in all; ``drain:*`` fields hold
    #: the drain rate measured by admission (``admit.lua``).
    stats: str = field(init=False)
    #: Sorted set: task id -> when its caller stopped waiting (unix seconds); trimmed by age, expires when idle.
    abandoned: str = field(init=False)
    #: String: a random id set by the first consumer; its disappearance means Redis lost its data.
    epoch: str = field(init=False)
    #: String: JSON ``{at, run_id}`` of the last time the consumers found Redis had lost its data.
    lost: str = field(init=False)
    #: Hash: consumer id -> JSON of the batching values it uses now (``batch_size``, ``max_delay``, ...), written
    #: at its heartbeat and when ``batching_set`` changes them; dropped with the consumer.
    tuning: str = field(init=False)

    def __post_init__(self) -> None:
        # Built once: the consumer reads them on every claim.
        for kind in ("claims", "delayed", "dead", "deliveries", "consumers", "stats", "abandoned", "epoch", "lost",
                     "tuning"):
            object.__setattr__(self, kind, f"{self.prefix}{NAMESPACE}:{kind}:{self.queue}")

    def claim(self, claim_id: str) -> str:
        """List of ``source list, raw message`` pairs that one consumer took for one batch."""
        return f"{self.prefix}{NAMESPACE}:claim:{self.queue}:{claim_id}"

    def flushes(self, now: float) -> str:
        """Hash of the minute that holds unix time ``now``: flush reason -> batches run for that reason."""
        return f"{self.prefix}{NAMESPACE}:flushes:{self.queue}:{int(now // FLUSH_BUCKET_S)}"

    def recent_flushes(self, now: float) -> list[str]:
        """The ``flushes`` hashes of the recent window ending at ``now``, newest first."""
        return [self.flushes(now - i * FLUSH_BUCKET_S) for i in range(FLUSH_WINDOW_BUCKETS)]

    def coalesce(self, digest: str) -> str:
        """String: the claim id of the batch computing the requests of coalescing key ``digest`` (``coalesce=True``);
        expires two leases after its last use, and counts only while that claim's lease runs."""
        return f"{self.prefix}{NAMESPACE}:coalesce:{self.queue}:{digest}"


def batch_sizes(stats: Mapping[bytes, bytes]) -> dict[int, int]:
    """The batch-size histogram held in a ``stats`` hash (as read with ``HGETALL``): size -> batches run."""
    return {int(k[5:]): int(v) for k, v in stats.items() if k.startswith(b"size:")}
