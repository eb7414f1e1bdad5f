"""The batching consumer: one thread per batched task, draining that task's Redis queue in batches.

The data path, top to bottom: claim the oldest messages (``store``) until the flush policy says run, decode them
(``codec``), set aside the ones that cannot run now (bad, expired, not yet due), merge the rest into one
``run_batch`` call and split its results (``merge``), store every outcome in the result backend (``results``), then
finish the claim (``store``) — after the results, so a crash in between repeats work rather than losing it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from celery import states
from celery.app.task import Context
from celery.exceptions import TaskRevokedError
from kombu.serialization import prepare_accept_content

from .codec import Request, Undecodable, decode
from .errors import BrokerError, MessageError
from .keys import QueueKeys
from .merge import execute
from .results import Outcome, ResultWriter
from .store import Claim, Finish, QueueStore

if TYPE_CHECKING:
    from .task import BatchedTask

logger = logging.getLogger(__name__)

#: Longest single blocking read while idle, in seconds: bounds how late a stop request or a message on a
#: non-default priority list (Redis can block on one list only) is noticed.
IDLE_POLL_S = 1.0
#: Backoff between reconnection attempts while Redis is unreachable, in seconds.
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 5.0


class BatchConsumer:
    """Serves one batched task until ``stop()``; Redis outages are waited out, never fatal."""

    def __init__(self, task: BatchedTask, *, hostname: str = "") -> None:
        self.task = task
        self.config = task.batching
        self.hostname = hostname
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: QueueStore | None = None
        self._connection: Any = None
        self._writer: ResultWriter | None = None
        # Content types as kombu's registry checks them ('json' -> 'application/json').
        self._accept = prepare_accept_content(task.app.conf.accept_content)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (failing loudly on a broker that cannot work) and serve in a daemon thread."""
        self.connect()
        self._thread = threading.Thread(target=self.run, name=f"batching-{self.task.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; the batch in hand is finished and stored before the thread ends."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def connect(self) -> QueueStore:
        """A redis-py client on the app's own broker connection pool (URL, TLS, Sentinel, transport options)."""
        app = self.task.app
        connection = app.connection_for_read()
        if connection.transport.driver_type != "redis":
            raise BrokerError(
                f"batched task {self.task.name!r} needs a Redis broker; this app's broker is "
                f"{connection.transport.driver_type!r} ({connection.as_uri()})"
            )
        channel = connection.default_channel
        client = redis.Redis(connection_pool=channel.pool)
        keys = QueueKeys(
            self.config.queue,
            prefix=channel.global_keyprefix or "",
            sep=channel.sep,
            priority_steps=tuple(channel.priority_steps),
        )
        if self._connection is not None:
            self._connection.release()
        self._connection = connection
        self._store = QueueStore(client, keys, lease_s=self.config.lease_s)
        self._writer = ResultWriter(app.backend)
        return self._store

    def run(self) -> None:
        """Thread body: serve batches until stopped, riding out Redis outages with capped backoff."""
        backoff = RECONNECT_MIN_S
        outage_since: float | None = None
        while not self._stop.is_set():
            try:
                if self._store is None:
                    self.connect()
                self.serve_once()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.warning(
                        "batching %s: Redis unreachable (%s); claimed work stays in Redis, retrying with backoff up "
                        "to %.0fs until it is back", self.task.name, exc, RECONNECT_MAX_S,
                    )
                self._store = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            except Exception:
                # A bug of ours must not end the consumer silently: log it, back off, keep serving. What was
                # claimed stays claimed in Redis.
                logger.exception("batching %s: unexpected error; continuing", self.task.name)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            if outage_since is not None:
                logger.warning(
                    "batching %s: Redis is back after %.1fs; serving again",
                    self.task.name, time.monotonic() - outage_since,
                )
                outage_since = None
            backoff = RECONNECT_MIN_S
        if self._connection is not None:
            self._connection.release()

    # -- one batch ---------------------------------------------------------------------------------------------

    def serve_once(self, idle_timeout_s: float = IDLE_POLL_S) -> int:
        """Collect one batch (waiting at most ``idle_timeout_s`` for a first message) and process it.

        Returns the number of messages claimed (0 if the queue stayed empty).
        """
        claim = self.collect(idle_timeout_s)
        if claim is None:
            return 0
        self.process(claim)
        return len(claim)

    def collect(self, idle_timeout_s: float) -> Claim | None:
        """Claim messages until the flush policy says the batch should run."""
        store = self._require_store()
        policy = self.config.policy
        claim = store.new_claim()
        oldest: float | None = None
        idle_until = time.monotonic() + idle_timeout_s
        while True:
            missing = policy.batch_size - len(claim)
            if missing > 0 and store.claim(claim, missing) and oldest is None:
                oldest = time.monotonic()
            now = time.monotonic()
            wait = policy.wait_s(now, oldest, len(claim))
            if wait is None:
                return claim
            if not claim and (now >= idle_until or self._stop.is_set()):
                return None
            timeout = min(wait, idle_until - now if not claim else wait, IDLE_POLL_S)
            if claim.next_eta is not None:
                timeout = min(timeout, max(claim.next_eta - time.time(), 0.0))
            store.wait(timeout)

    def process(self, claim: Claim) -> None:
        """Decode, run, store results, finish the claim."""
        store = self._require_store()
        assert self._writer is not None
        outcomes: list[Outcome] = []
        finish = Finish()
        runnable: list[Request] = []
        now = time.time()
        accept = self._accept
        for raw in claim.raws:
            item = decode(raw, accept)
            if isinstance(item, Undecodable):
                if item.task_id is not None:
                    outcomes.append(Outcome.failure(item.task_id, item.error))
                else:
                    logger.warning("batching %s: dead-lettered a message: %s", self.task.name, item.error)
                    finish.dead.append((str(item.error), raw))
            elif item.task != self.task.name:
                error = MessageError(
                    f"task {item.task!r} was sent to the batch queue {self.config.queue!r}, which only serves "
                    f"{self.task.name!r}"
                )
                outcomes.append(Outcome.failure(item.id, error, self._context(item)))
            elif item.expires is not None and item.expires <= now:
                outcomes.append(Outcome(item.id, states.REVOKED, TaskRevokedError("expired"), self._context(item)))
            elif item.eta is not None and item.eta > now:
                finish.delayed.append((item.eta, raw))
            else:
                runnable.append(item)
        if runnable:
            outcomes.extend(self._run(runnable))
        self._writer.write(outcomes)
        finish.ran = len(runnable)
        store.finish(claim, finish)

    def _run(self, batch: list[Request]) -> list[Outcome]:
        try:
            run_batch = self.config.run_batch()
        except Exception as exc:  # a model that cannot load fails this batch; the next batch tries again
            logger.exception("batching %s: building the model failed", self.task.name)
            results: list[Any] = [exc] * len(batch)
        else:
            results = execute(self.config.spec, run_batch, [(r.args, r.kwargs) for r in batch])
        out = []
        for request, result in zip(batch, results, strict=True):
            context = self._context(request)
            if isinstance(result, Exception):
                out.append(Outcome.failure(request.id, result, context))
            else:
                out.append(Outcome(request.id, states.SUCCESS, result, context))
        return out

    def _context(self, request: Request) -> Context:
        """The task request as Celery's tracer would see it (result metadata, result_extended, chords)."""
        h = request.headers
        return Context(
            id=request.id,
            task=request.task,
            args=request.args,
            kwargs=request.kwargs,
            group=h.get("group"),
            group_index=h.get("group_index"),
            parent_id=h.get("parent_id"),
            root_id=h.get("root_id"),
            retries=h.get("retries", 0),
            hostname=self.hostname,
            delivery_info={"routing_key": self.config.queue},
            ignore_result=bool(h.get("ignore_result")) or self.task.ignore_result,
            **request.embed,
        )

    def _require_store(self) -> QueueStore:
        if self._store is None:
            self.connect()
        assert self._store is not None
        return self._store
