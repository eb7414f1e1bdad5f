"""``rate_limit`` for a batched task: items per second per worker, enforced where messages are claimed.

Celery limits a plain task per worker with a token bucket per task type (``kombu.utils.limits.TokenBucket``,
capacity 1). A batched task's "worker" is its consumer, so the fetch thread takes a token per message before
claiming it: ``rate_limit="5/s"`` runs 20 queued items in about 3.8 s, as for a plain task, and batches hold what
the rate lets through (batching resumes as soon as the rate allows more than one item per ``max_delay``). The
bucket holds a tenth of a second's worth of tokens (at least one), so a high rate is not capped by the claim
loop's polling interval. The limit is read from the task on every claim round trip, so ``celery control
rate_limit`` changes it at runtime, as it does for plain tasks; ``worker_disable_rate_limits`` turns it off.

The rejected alternative, batches per second, would make the meaning of a limit depend on ``batch_size``.
"""

from __future__ import annotations

from typing import Any

from celery.utils.time import rate
from kombu.utils.limits import TokenBucket

#: Seconds of tokens the bucket may hold: bursts are at most this long at the full rate.
BURST_S = 0.1


class RateLimiter:
    """Grants claims of up to ``n`` messages as ``task.rate_limit`` allows; used by one fetch thread."""

    __slots__ = ("_bucket", "_spec", "task")

    def __init__(self, task: Any) -> None:
        self.task = task
        self._spec: Any = None
        self._bucket: TokenBucket | None = None

    @classmethod
    def for_task(cls, task: Any) -> RateLimiter | None:
        """``None`` when the worker disables rate limits (``worker_disable_rate_limits``)."""
        if task is None or task.app.conf.worker_disable_rate_limits:
            return None
        return cls(task)

    def _current(self) -> TokenBucket | None:
        spec = self.task.rate_limit
        if spec != self._spec:  # set at definition, or changed by ``celery control rate_limit``
            self._spec = spec
            per_s = rate(spec) if spec else 0.0
            self._bucket = TokenBucket(per_s, capacity=max(1.0, per_s * BURST_S)) if per_s > 0 else None
        return self._bucket

    def grant(self, n: int) -> int:
        """How many of ``n`` messages may be claimed now (0: wait ``wait_s()``)."""
        bucket = self._current()
        if bucket is None:
            return n
        granted = min(n, int(bucket._get_tokens()))  # the bucket's level; kombu has no public reader
        if granted > 0:
            bucket.can_consume(granted)
        return granted

    def refund(self, n: int) -> None:
        """Give back tokens granted for messages the queue did not have."""
        if self._bucket is not None:
            self._bucket._tokens = min(self._bucket.capacity, self._bucket._tokens + n)

    def wait_s(self) -> float:
        """Seconds until one more message may be claimed."""
        bucket = self._current()
        return 0.0 if bucket is None else bucket.expected_time(1)
