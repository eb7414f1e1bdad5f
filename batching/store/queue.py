"""The Redis side of a batched queue: claim the oldest messages, wait for more, finish, release or recover claims.

Every state change is one Lua script, so a message is always either in its queue, in exactly one consumer's
claim, parked until its ETA, or dead-lettered; the scripts live in ``lua/`` with their contracts in their headers.
A claim is owned through its random id (a token only its consumer knows) and held by a lease deadline that the
consumer's heartbeat keeps pushing forward; once the deadline has passed, any consumer may put it back.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from ..errors import BrokerError, NotReplicated
from .keys import FLUSH_BUCKET_S, FLUSH_WINDOW_BUCKETS, QueueKeys, batch_sizes
from .lua import script
from .replication import NO_WAIT, Replicas

if TYPE_CHECKING:
    from ..settings import BatchSettings

#: Why a message handed out ``max_deliveries`` times never finished: its dead-letter reason and its task's error.
NEVER_FINISHED = ("every consumer that took it died or lost its lease (a crash, an OOM kill or a hang in "
                  "run_batch)")


@dataclass
class Claim:
    """Messages one consumer took for one batch, under one claim id (its ownership token)."""

    claim_id: str
    raws: list[bytes] = field(default_factory=list)
    #: Unix time of the earliest parked (ETA) message, if any, so the consumer can wake for it.
    next_eta: float | None = None
    #: How many times the (single) message of this claim was handed out before without finishing.
    redelivered: int = 0
    #: Whether some caller of this queue gave up waiting lately: only then are claimed ids looked up.
    abandonments: bool = False
    #: The queue's epoch when it was claimed: a claim from before Redis lost its data is gone, not taken over.
    epoch: str | None = None

    def __len__(self) -> int:
        return len(self.raws)


@dataclass
class Finish:
    """What to do with a claim's messages once its results are stored."""

    ran: int = 0
    #: Why the batch that ran was flushed (``policy.FLUSH_REASONS``), counted in the recent window.
    flush_reason: str = ""
    delayed: list[tuple[float, bytes]] = field(default_factory=list)
    dead: list[tuple[str, bytes]] = field(default_factory=list)


class QueueStore:
    """Claims and finishes batches of one queue through a redis-py client of the app's broker."""

    def __init__(
        self, client: redis.Redis, keys: QueueKeys, *, lease_s: float = 20.0, max_deliveries: int = 3,
        replicas: Replicas = NO_WAIT,
    ) -> None:
        self.client = client
        self.keys = keys
        self.lease_s = lease_s
        self.max_deliveries = max_deliveries
        #: Durable mode (``wait_replicas``): claims and finishes count only once replicas acknowledged them.
        self.replicas = replicas
        self._claim = script(client, "claim.lua")
        self._ack = script(client, "ack.lua")
        self._requeue = script(client, "requeue.lua")
        self._requeue_dead = script(client, "requeue_dead.lua")
        self._heartbeat = script(client, "heartbeat.lua")
        self._carry = script(client, "carry.lua")
        #: Redis's clock minus this host's, in seconds: every time decision is Redis's (see ``now``).
        self.clock_offset_s = 0.0
        #: The queue's epoch as this store last saw it (``join_epoch``, heartbeats).
        self.epoch: str | None = None

    @classmethod
    def open(
        cls, app: Any, settings: BatchSettings, *, socket_timeout_s: float | None = None
    ) -> tuple[QueueStore, Any]:
        """The store of a batched task's queue on the app's own broker settings, and the kombu connection behind it.

        The redis-py client shares kombu's connection pool, so URL, password, ``rediss://`` TLS and Sentinel all
        work as for ``.delay()``; keys follow the transport's ``global_keyprefix``, ``sep`` and
        ``priority_steps``. Raises ``BrokerError`` for a broker that is not Redis or cannot be reached.

        With ``socket_timeout_s`` its connections fail a read that gets no answer within that time and probe idle
        links with TCP keepalive, unless the app's ``broker_transport_options`` say otherwise: a silent partition
        (packets dropped, no reset) is then an outage within seconds, not when TCP gives up minutes later.
        """
        queue = settings.queue
        ours = {} if socket_timeout_s is None else dead_link_options(socket_timeout_s)
        given = app.conf.broker_transport_options or {}
        connection = app.connection_for_read(transport_options={k: v for k, v in ours.items() if k not in given})
        require_redis(connection, f"batched task {settings.name!r}")
        try:
            channel = connection.default_channel
        except Exception as exc:
            raise BrokerError(f"batched task {settings.name!r} cannot reach its broker {connection.as_uri()}: {exc}") \
                from exc
        keys = QueueKeys(
            queue,
            prefix=channel.global_keyprefix or "",
            sep=channel.sep,
            priority_steps=tuple(channel.priority_steps),
        )
        client = redis.Redis(connection_pool=channel.pool)
        replicas = Replicas(settings.wait_replicas, settings.wait_timeout)
        return cls(client, keys, lease_s=settings.lease_s, max_deliveries=settings.max_deliveries,
                   replicas=replicas), connection

    def new_claim(self) -> Claim:
        return Claim(uuid.uuid4().hex, epoch=self.epoch)

    def join_epoch(self) -> str:
        """Read the queue's epoch marker, setting it if this is the first consumer (see ``lua/heartbeat.lua``)."""
        self.client.set(self.keys.epoch, uuid.uuid4().hex, nx=True)
        epoch = self.client.get(self.keys.epoch)
        self.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        return self.epoch

    def now(self) -> float:
        """Redis's current time (unix seconds), as last measured: the one clock of every consumer and client.

        Leases, heartbeats, recovery and ETAs are decided inside the scripts by Redis's TIME; what the consumer
        decides itself (is a message expired? how long until the next ETA?) uses this, never its own clock alone.
        """
        return time.time() + self.clock_offset_s

    def sync_clock(self) -> float:
        """Measure Redis's clock against this host's (one round trip); returns the offset in seconds."""
        before = time.time()
        seconds, micros = self.client.time()
        self._set_offset(before, seconds + micros / 1e6)
        return self.clock_offset_s

    def _set_offset(self, sent_at: float, redis_now: float) -> None:
        # Redis read its clock somewhere within the round trip: its midpoint is the best guess.
        self.clock_offset_s = redis_now - (sent_at + time.time()) / 2

    def claim(self, into: Claim, count: int) -> int:
        """Move up to ``count`` of the oldest messages into ``into``; return how many were taken.

        A message that was handed out before without finishing comes alone (``into.redelivered`` says how often).
        """
        if into.redelivered:
            return 0  # a suspect message runs alone
        k = self.keys
        keys = [k.claims, k.claim(into.claim_id), k.delayed, k.deliveries, k.abandoned, *k.lists]
        args = [count, into.claim_id, self.lease_s, len(into.raws)]
        reply = self._claim_durably(into, keys, args) if self.replicas else self._claim(keys=keys, args=args)
        into.next_eta = float(reply[0]) if reply[0] else None
        into.abandonments = bool(int(reply[2]))
        taken = reply[3:]
        if taken and int(reply[1]) and into.raws:
            raise AssertionError("claim.lua returned a redelivered message into a non-empty claim")
        into.redelivered = int(reply[1])
        into.raws.extend(taken)
        return len(taken)

    def _claim_durably(self, into: Claim, keys: list[str], args: list[Any]) -> Any:
        """``claim.lua`` confirmed by replicas. An unconfirmed claim is given back at once, whole (a release, which
        counts no delivery), and its batch is dropped unrun by the caller, as after any failed claim call: after a
        failover a replica that never saw the claim would hand the same messages out again."""
        try:
            (reply,) = self.replicas.run(self.client, lambda pipe: self._claim(keys=keys, args=args, client=pipe),
                                         f"a claim of {self.keys.queue!r}")
        except NotReplicated:
            self._requeue_claims("release", [into.claim_id])
            raise
        return reply

    def carry(self, source: Claim, into: Claim, raws: list[bytes]) -> int:
        """Move ``raws`` from ``source`` into ``into`` (both this consumer's claims), keeping them claimed for a later
        batch; returns how many moved (0: ``source`` was no longer ours, its messages are back in the queue).

        In durable mode the move is confirmed by replicas like a claim: a replica promoted without it would still
        list the moved messages in ``source``, whose finish would then drop them unrun. Unconfirmed, it raises
        ``NotReplicated`` and the caller drops both claims unrun, for their leases to bring everything back.
        """
        if not raws:
            return 0
        k = self.keys
        keys = [k.claims, k.claim(source.claim_id), k.claim(into.claim_id)]
        args = [source.claim_id, into.claim_id, self.lease_s, *raws]
        if self.replicas:
            (reply,) = self.replicas.run(self.client, lambda pipe: self._carry(keys=keys, args=args, client=pipe),
                                         f"a carried claim of {self.keys.queue!r}")
        else:
            reply = self._carry(keys=keys, args=args)
        moved = int(reply)
        if moved:
            gone = set(raws)
            source.raws[:] = [raw for raw in source.raws if raw not in gone]
            into.raws.extend(raws)
        return moved

    def abandoned_among(self, task_ids: list[str]) -> set[str]:
        """Those of ``task_ids`` whose caller gave up waiting (one ZMSCORE)."""
        if not task_ids:
            return set()
        scores = self.client.zmscore(self.keys.abandoned, task_ids)
        return {task_id for task_id, score in zip(task_ids, scores, strict=True) if score is not None}

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
        """Drop the claim, parking ETA messages and dead letters in the same atomic step.

        Returns False if the claim was no longer ours (its lease ran out and it was re-queued meanwhile).
        """
        k = self.keys
        args: list[Any] = [claim.claim_id, outcome.ran, len(outcome.delayed), k.queue, outcome.flush_reason or "?",
                           (FLUSH_WINDOW_BUCKETS + 1) * FLUSH_BUCKET_S]
        for eta, raw in outcome.delayed:
            args += [eta, raw]
        for reason, raw in outcome.dead:
            args += [reason, raw]
        keys = [k.claims, k.claim(claim.claim_id), k.delayed, k.dead, k.stats, k.deliveries, k.flushes(self.now())]
        if not self.replicas:
            return bool(self._ack(keys=keys, args=args))
        (finished,) = self.replicas.run(self.client, lambda pipe: self._ack(keys=keys, args=args, client=pipe),
                                        f"the finish of a claim of {self.keys.queue!r}")
        return bool(finished)

    def owns(self, claim: Claim) -> bool:
        """True while the claim is registered: its lease has not been taken over by another consumer."""
        return self.client.zscore(self.keys.claims, claim.claim_id) is not None

    def outlived_data(self, claim: Claim) -> bool:
        """True if Redis lost its data since ``claim`` was made (the epoch marker is gone or new): the claim did
        not pass to another consumer, it vanished with everything else."""
        epoch = self.client.get(self.keys.epoch)
        return epoch is None or epoch.decode() != claim.epoch  # type: ignore[union-attr]

    def release(self, claim_ids: Iterable[str]) -> int:
        """Give back claims whose batches never started, to the front of their queue; returns messages requeued."""
        requeued, _dead = self._requeue_claims("release", list(claim_ids))
        return requeued

    def heartbeat(self, consumer_id: str, claim_ids: Iterable[str], tuning: str = "{}") -> bool:
        """Extend the leases of our live claims (never re-creating one already recovered) and say we are alive, with
        the batching values we use (``tuning``, JSON) for ``batching status``.

        Also re-measures the clock offset from the TIME the script returns. Returns True if this heartbeat found
        that Redis had lost its data (the epoch marker was gone; a new epoch starts).
        """
        sent_at = time.time()
        seconds, micros, epoch, lost = self._heartbeat(
            keys=[self.keys.claims, self.keys.consumers, self.keys.epoch, self.keys.tuning],
            args=[self.lease_s, consumer_id, uuid.uuid4().hex, tuning, *claim_ids],
        )
        self._set_offset(sent_at, int(seconds) + int(micros) / 1e6)
        self.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        return bool(int(lost))

    def leave(self, consumer_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.consumers, consumer_id)
            pipe.hdel(self.keys.tuning, consumer_id)
            pipe.execute()

    def report_tuning(self, consumer_id: str, tuning: str) -> None:
        """Record at once the batching values a consumer uses now (JSON), as its heartbeats do."""
        self.client.hset(self.keys.tuning, consumer_id, tuning)

    def recover(self, limit: int = 20) -> tuple[int, list[bytes]]:
        """Re-queue the claims whose lease has run out: their consumer died or hung.

        Returns the number of messages put back and the raw messages dead-lettered for too many deliveries.
        """
        seconds, micros = self.client.time()
        expired: list[bytes] = self.client.zrangebyscore(  # type: ignore[assignment]
            self.keys.claims, "-inf", seconds + micros / 1e6, start=0, num=limit
        )
        if not expired:
            return 0, []
        return self._requeue_claims("expired", [c.decode() for c in expired])

    def _requeue_claims(self, mode: str, claim_ids: list[str]) -> tuple[int, list[bytes]]:
        if not claim_ids:
            return 0, []
        k = self.keys
        reply = self._requeue(
            keys=[k.claims, k.deliveries, k.dead, *(k.claim(c) for c in claim_ids)],
            args=[mode, self.max_deliveries, k.queue, NEVER_FINISHED, *claim_ids],
        )
        return int(reply[0]), list(reply[1:])

    def dead_letters(self, start: int = 0, stop: int = -1) -> list[bytes]:
        """Dead-letter entries, newest first."""
        return self.client.lrange(self.keys.dead, start, stop)  # type: ignore[return-value]

    def requeue_dead(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Move dead letters back to the queue as new messages: (entry as stored, raw message) pairs.

        Each entry is moved only if it is still there, in one script with the push, so two operators re-queuing
        at once never duplicate a message and a caller that dies midway never loses one. Its delivery count starts
        again from zero.
        """
        k = self.keys
        moved = 0
        for entry, raw in entries:
            moved += int(self._requeue_dead(keys=[k.dead, k.deliveries, k.main], args=[entry, raw]))
        return moved

    def purge(self) -> tuple[int, int]:
        """Delete every queued message (all priority lists) and every message waiting for its ETA, atomically;
        claims are kept (their batches finish, or come back by lease). Returns (queued, delayed) deleted."""
        lists = self.keys.lists
        with self.client.pipeline(transaction=True) as pipe:
            for key in lists:
                pipe.llen(key)
            pipe.zcard(self.keys.delayed)
            pipe.delete(*lists, self.keys.delayed)
            counts = pipe.execute()
        return sum(int(n) for n in counts[:len(lists)]), int(counts[len(lists)])

    def purge_dead(self) -> int:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.llen(self.keys.dead)
            pipe.delete(self.keys.dead)
            count, _ = pipe.execute()
        return int(count)

    def batch_sizes(self) -> dict[int, int]:
        """Histogram of batch sizes run so far on this queue (all consumers)."""
        stats: dict[bytes, bytes] = self.client.hgetall(self.keys.stats)  # type: ignore[assignment]
        return batch_sizes(stats)


def dead_link_options(socket_timeout_s: float) -> dict[str, Any]:
    """redis-py connection options that notice a dead link: a read timeout, connect timeout and TCP keepalive."""
    probes = {}
    for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            probes[getattr(socket, name)] = value
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": probes,
    }


def require_redis(connection: Any, what: str) -> None:
    """Raise ``BrokerError`` unless the kombu ``connection`` is to Redis: the only broker whose queues we drain."""
    driver = connection.transport.driver_type
    if driver != "redis":
        raise BrokerError(f"{what} needs a Redis broker; this app's broker is {driver!r} ({connection.as_uri()})")
