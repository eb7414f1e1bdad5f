"""What a batched task's queue holds right now: depth, claims, delayed, dead letters, consumers, batch statistics,
why recent batches were flushed and the batching values each consumer uses.

One snapshot costs two round trips: a ``MULTI`` of every counter (so depth, the oldest message and the claims are
read at the same instant), then the length and oldest message of each claim it found. ``batching status`` prints these
(``batching.queue_status``); the worker's metrics call ``status_of`` on the store each consumer keeps open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .keys import FLUSH_BUCKET_S, FLUSH_WINDOW_BUCKETS, batch_sizes
from .queue import QueueStore

#: A consumer counts as live if its last heartbeat is within this many leases (heartbeats come every lease/4).
LIVE_LEASES = 2.0


@dataclass(frozen=True)
class QueueStatus:
    """A snapshot of one batched task's queue, as every consumer of it sees it."""

    task: str
    queue: str
    #: Messages waiting in the queue, over all its priority lists.
    depth: int
    #: Messages taken by consumers for a batch that has not finished (in any claim).
    in_flight: int
    claims: int
    #: Messages parked until their ETA (countdown/eta).
    delayed: int
    dead: int
    #: Consumers whose last heartbeat is within ``LIVE_LEASES`` leases.
    consumers: int
    #: The queue's lease in seconds: heartbeats come every quarter of it.
    lease_s: float
    #: Seconds since the next message to be served was sent; ``None`` when the queue is empty or the message
    #: carries no ``sent_at`` header.
    oldest_age_s: float | None
    #: Requests waiting plus in flight (``depth + in_flight``): the load an autoscaler should see. Claimed
    #: messages have left the queue's lists, so ``LLEN`` alone misses them; delayed ones are not due yet.
    backlog: int
    #: Seconds since the oldest request waiting (any priority) or in flight was sent; ``None`` when there is none
    #: or none carries a ``sent_at`` header.
    oldest_request_age_s: float | None
    batches: int
    #: Requests counted by the consumers (the ``requests`` counter of the stats hash).
    requests: int
    mean_batch_size: float | None
    #: Batches run so far, by size: size -> batches.
    batch_sizes: dict[int, int]
    #: Seconds since each recently seen consumer's last heartbeat (every lease/4 while it is healthy): the health
    #: signal of a consumer that is up but wedged.
    heartbeat_ages_s: dict[str, float]
    #: When the consumers last found that Redis had lost its data (unix seconds), if ever.
    data_lost_at: float | None
    #: Batches run in the last ``flush_window_s`` seconds, by why they were flushed (``count``, ``cost``,
    #: ``max_delay``, ``empty``, ``shutdown``).
    flush_reasons: dict[str, int]
    flush_window_s: float
    #: The batching values each live consumer uses now (``batch_size``, ``max_delay``, ...), by consumer id: what
    #: ``batching_set`` changed, or the task's own.
    tuning: dict[str, dict[str, Any]]


def status_of(store: QueueStore, task_name: str, *, now: float | None = None) -> QueueStatus:
    """Snapshot of the queue behind ``store``; ``now`` in unix seconds (default: Redis's clock, ``store.now()``)."""
    now = store.now() if now is None else now
    keys = store.keys
    lists = keys.lists
    with store.client.pipeline(transaction=True) as pipe:
        for name in lists:
            pipe.llen(name)
        for name in lists:
            pipe.lindex(name, -1)  # the right end is the oldest: kombu pushes left and the consumer takes right
        pipe.zrange(keys.claims, 0, -1)
        pipe.zcard(keys.delayed)
        pipe.llen(keys.dead)
        pipe.zcount(keys.consumers, now - LIVE_LEASES * store.lease_s, "+inf")
        pipe.hgetall(keys.stats)
        pipe.zrange(keys.consumers, 0, -1, withscores=True)
        pipe.get(keys.lost)
        pipe.hgetall(keys.tuning)
        recent = keys.recent_flushes(now)
        for key in recent:
            pipe.hgetall(key)
        reply: list[Any] = pipe.execute()
    n = len(lists)
    lengths, ends = reply[:n], reply[n:2 * n]
    claim_ids, delayed, dead, consumers, stats, beats, lost, tuning = reply[2 * n:2 * n + 8]
    flushes: dict[str, int] = {}
    for counts in reply[2 * n + 8:]:
        for reason, count in counts.items():
            flushes[reason.decode()] = flushes.get(reason.decode(), 0) + int(count)
    # Highest priority first: the first non-empty list holds the next message to be served.
    oldest = next((raw for raw in ends if raw is not None), None)
    sizes = batch_sizes(stats)
    batches = sum(sizes.values())
    depth = sum(int(x) for x in lengths)
    in_flight, claimed_heads = _in_flight(store, [c.decode() for c in claim_ids])
    ages = [age for raw in (*ends, *claimed_heads) if (age := _age(raw, now)) is not None]
    live = {c.decode() for c, at in beats if float(at) >= now - LIVE_LEASES * store.lease_s}
    return QueueStatus(
        task=task_name,
        queue=keys.queue,
        depth=depth,
        in_flight=in_flight,
        claims=len(claim_ids),
        delayed=int(delayed),
        dead=int(dead),
        consumers=int(consumers),
        lease_s=store.lease_s,
        oldest_age_s=_age(oldest, now),
        backlog=depth + in_flight,
        oldest_request_age_s=max(ages, default=None),
        batches=batches,
        requests=int(stats.get(b"requests", 0)),
        mean_batch_size=sum(size * count for size, count in sizes.items()) / batches if batches else None,
        batch_sizes=dict(sorted(sizes.items())),
        heartbeat_ages_s={c.decode(): max(0.0, now - float(at)) for c, at in beats},
        data_lost_at=_lost_at(lost),
        flush_reasons=dict(sorted(flushes.items())),
        flush_window_s=float(FLUSH_WINDOW_BUCKETS * FLUSH_BUCKET_S),
        tuning={c: v for c, v in sorted(_tuning(tuning).items()) if c in live},
    )


def _tuning(entries: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    out = {}
    for consumer, values in entries.items():
        try:
            out[consumer.decode()] = json.loads(values)
        except ValueError:
            continue
    return out


def _lost_at(entry: bytes | None) -> float | None:
    try:
        return float(json.loads(entry)["at"]) if entry else None
    except (ValueError, TypeError, KeyError):
        return None


def _in_flight(store: QueueStore, claim_ids: list[str]) -> tuple[int, list[bytes | None]]:
    """Messages held in these claims, and each claim's oldest message."""
    if not claim_ids:
        return 0, []
    with store.client.pipeline(transaction=False) as pipe:
        for claim_id in claim_ids:
            pipe.llen(store.keys.claim(claim_id))
            pipe.lindex(store.keys.claim(claim_id), 1)  # claimed oldest first, after the list it came from
        reply: list[Any] = pipe.execute()
    # A claim list holds (source list, raw message) pairs.
    return sum(reply[0::2]) // 2, reply[1::2]


def _age(raw: bytes | None, now: float) -> float | None:
    """Seconds since ``raw`` was sent, from its ``sent_at`` header (unix seconds), if it has a usable one."""
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        sent_at = envelope["headers"]["sent_at"]
        return max(0.0, now - float(sent_at))
    except (ValueError, TypeError, KeyError):
        return None
