"""The supervisor: a consumer thread that ended anyway (a bug, an exception nobody foresaw) does not leave its task
unserved. Every consumer's loops already log and survive errors; this is the net below them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .consumer import BatchConsumer

logger = logging.getLogger(__name__)

#: How often the consumers' threads are checked, in seconds.
CHECK_S = 1.0


class Supervisor:
    """Replaces a consumer one of whose threads died with a fresh one for the same task."""

    def __init__(self, consumers: list[BatchConsumer], replace: Callable[[BatchConsumer], BatchConsumer],
                 interval_s: float = CHECK_S) -> None:
        self.consumers = consumers
        self.replace = replace
        self.interval_s = interval_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batching-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval_s * 2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:
                logger.exception("batching: the supervisor's check failed; checking again in %ss", self.interval_s)

    def check(self) -> int:
        """Replace every consumer with a dead thread; returns how many were replaced."""
        replaced = 0
        for index, consumer in enumerate(list(self.consumers)):
            dead = consumer.dead_threads()
            if not dead or self._stop.is_set():
                continue
            logger.error("batching %s: consumer thread(s) %s stopped unexpectedly; starting a new consumer (the old "
                         "one's claims come back through their lease)", consumer.name, ", ".join(dead))
            consumer.abandon()
            fresh = self.replace(consumer)
            fresh.start()
            self.consumers[index] = fresh
            self.restarts += 1
            replaced += 1
        return replaced
