"""One Redis pub/sub connection per event loop, shared by every coroutine waiting for a Celery result.

Celery's Redis backend stores a result with ``SET celery-task-meta-<id>`` and announces it with ``PUBLISH`` on the
same key. A waiter must subscribe *before* it looks, or a result published in between is lost; Celery's own
``get()`` does this with one subscription per thread, which an event loop cannot use without a thread per waiter.

Here every waiter of the loop shares one connection. Two tasks own it: the *reader* is the only one that reads
from it, and the *controller* is the only one that writes to it (batched SUBSCRIBE / UNSUBSCRIBE) and looks results
up (one MGET over every newly confirmed key). A key is looked up only once Redis has *confirmed* its subscription
(the reader sees the confirmation): whatever was stored before that is found by the MGET, and whatever is
published after it arrives on the connection. A reconnect makes redis-py subscribe to every key again; those
confirmations trigger the same MGET, so results published while the connection was down are found too. A key
with no waiter left (result delivered, waiter timed out or cancelled) is unsubscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio
from celery import states
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

#: Errors after which the connection is re-established; waiters keep waiting meanwhile.
RECONNECT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
#: Keys per SUBSCRIBE, UNSUBSCRIBE or MGET command.
COMMAND_CHUNK = 1000
#: Backoff between reconnection attempts, doubling (seconds).
RETRY_MIN_S, RETRY_MAX_S = 0.05, 2.0
#: Seconds each step of closing may take.
CLOSE_TIMEOUT_S = 2.0


class ResultListener:
    """Waits for Celery results on one Redis (a result backend's), for any number of coroutines of one loop."""

    def __init__(self, client: redis.asyncio.Redis, decode: Callable[[bytes], dict[str, Any]]) -> None:
        self.client = client
        self.decode = decode
        self.pubsub = client.pubsub()
        self.waiters: dict[bytes, set[asyncio.Future[dict[str, Any]]]] = {}
        self._subscribe: set[bytes] = set()
        self._unsubscribe: set[bytes] = set()
        self._check: set[bytes] = set()
        self._work = asyncio.Event()
        self._connected = asyncio.Event()  # the pub/sub connection exists: the reader may read
        self._tasks = [asyncio.create_task(self._control(), name="batching-results-control"),
                       asyncio.create_task(self._read(), name="batching-results-reader")]
        self._down = False

    # -- waiters -----------------------------------------------------------------------------------------------

    def add(self, key: bytes) -> asyncio.Future[dict[str, Any]]:
        """A future that resolves to the result meta stored under ``key`` once it is ready; ``discard`` it after."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting = self.waiters.get(key)
        if waiting is None:
            waiting = self.waiters[key] = set()
            self._unsubscribe.discard(key)
            self._subscribe.add(key)
            self._work.set()
        waiting.add(future)
        return future

    def discard(self, key: bytes, future: asyncio.Future[dict[str, Any]]) -> None:
        """Forget a waiter (done, timed out or cancelled); the last one of a key unsubscribes it."""
        waiting = self.waiters.get(key)
        if waiting is None:
            return
        waiting.discard(future)
        if not waiting:
            del self.waiters[key]
            self._subscribe.discard(key)
            self._unsubscribe.add(key)
            self._work.set()

    def _deliver(self, key: bytes, raw: bytes) -> None:
        waiting = self.waiters.get(key)
        if not waiting:
            return
        meta = self.decode(raw)
        if meta.get("status") not in states.READY_STATES:
            return  # STARTED, RETRY: keep waiting for the final state
        for future in waiting:
            if not future.done():
                future.set_result(meta)

    def _fail_all(self, exc: BaseException) -> None:
        for waiting in self.waiters.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)

    # -- the controller: the only writer -----------------------------------------------------------------------

    async def _control(self) -> None:
        delay = RETRY_MIN_S
        while True:
            await self._work.wait()
            self._work.clear()
            try:
                await self._flush()
                delay = RETRY_MIN_S
            except RECONNECT_ERRORS as exc:
                self._went_down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                self._work.set()  # what failed is still pending: try again
            except Exception as exc:  # never leave waiters hanging on a bug or an undecodable result
                logger.exception("batching.aio: result listener failed; failing its waiters")
                self._fail_all(exc)

    async def _flush(self) -> None:
        if self._unsubscribe:
            keys = [k for k in self._unsubscribe if k not in self.waiters]
            self._unsubscribe.clear()
            if self.pubsub.connection is not None:
                for chunk in _chunks(keys):
                    await self.pubsub.unsubscribe(*chunk)
        if self._subscribe:
            keys = [k for k in self._subscribe if k in self.waiters]
            for chunk in _chunks(keys):
                await self.pubsub.subscribe(*chunk)
                self._subscribe.difference_update(chunk)
            self._connected.set()
        while self._check:
            # Confirmed subscriptions: a result stored before the confirmation is here, later ones are published.
            self._check.intersection_update(self.waiters)
            for chunk in _chunks(list(self._check)):
                values = await self.client.mget(chunk)
                self._check.difference_update(chunk)  # only once looked up: a failed MGET is tried again
                for key, raw in zip(chunk, values, strict=True):
                    if raw is not None:
                        self._deliver(key, raw)  # type: ignore[arg-type]

    # -- the reader: the only reader ---------------------------------------------------------------------------

    async def _read(self) -> None:
        await self._connected.wait()
        delay = RETRY_MIN_S
        while True:
            try:
                message = await self.pubsub.get_message(timeout=None)
            except RECONNECT_ERRORS as exc:
                self._went_down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                with contextlib.suppress(*RECONNECT_ERRORS):
                    # redis-py subscribes to every channel again on connect; their confirmations trigger the MGET.
                    await self.pubsub.connect()
                continue
            except Exception as exc:
                logger.exception("batching.aio: result listener failed; failing its waiters")
                self._fail_all(exc)
                await asyncio.sleep(delay)
                continue
            delay = RETRY_MIN_S
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                try:
                    self._deliver(message["channel"], message["data"])
                except Exception as exc:
                    logger.exception("batching.aio: could not decode a result")
                    self._fail_key(message["channel"], exc)
            elif kind == "subscribe":
                if self._down:
                    self._down = False
                    logger.warning("batching.aio: result subscriptions are back; looking up what was missed")
                if message["channel"] in self.waiters:
                    self._check.add(message["channel"])
                    self._work.set()

    def _fail_key(self, key: bytes, exc: BaseException) -> None:
        for future in self.waiters.get(key, ()):
            if not future.done():
                future.set_exception(exc)

    def _went_down(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            logger.warning("batching.aio: lost the result subscription connection (%s); waiters keep waiting while "
                           "it reconnects", exc)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)
        for closing in (self.pubsub.aclose, self.client.aclose):
            # Bounded: closing must not hang on a Redis that is gone.
            with contextlib.suppress(TimeoutError, *RECONNECT_ERRORS):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await closing()


def _chunks(keys: list[bytes]) -> list[list[bytes]]:
    return [keys[i:i + COMMAND_CHUNK] for i in range(0, len(keys), COMMAND_CHUNK)]
