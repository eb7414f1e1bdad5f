"""When a forming batch should run: the flush policy, with time passed in so it is tested without sleeping."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigurationError

#: Why a batch ran when it did (``Batch.flush_reason``, the ``reason`` label of the batch metrics, the flush column
#: of ``batching status``): full by count; full by its cost budget; its oldest request waited ``max_delay``; the
#: queue had no more (greedy, ``max_delay=0``); the worker was shutting down.
COUNT, COST, MAX_DELAY, EMPTY, SHUTDOWN = "count", "cost", "max_delay", "empty", "shutdown"
FLUSH_REASONS = (COUNT, COST, MAX_DELAY, EMPTY, SHUTDOWN)


@dataclass(frozen=True)
class FlushPolicy:
    """Run a batch when it is full, or when its *oldest* request has waited ``max_delay_s``.

    Measuring from the oldest request (as Triton and TF Serving do) bounds every request's extra wait by
    ``max_delay_s``; measuring per arrival gap, as the batcher this replaces did, lets a trickle of requests hold the
    first one for up to ``(batch_size - 1) * delay``. ``max_delay_s == 0`` never waits: whatever is queued runs as
    soon as the consumer is free, and under load batches fill by themselves while the previous one runs.
    """

    batch_size: int
    max_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_delay_s, (int, float)) or not 0 <= self.max_delay_s < 3600:
            raise ConfigurationError(f"max_delay must be a number of seconds in [0, 3600), got {self.max_delay_s!r}")

    def wait_s(self, now: float, oldest: float | None, count: int) -> float | None:
        """How long to keep collecting before running, or ``None`` if the batch should run now.

        ``oldest`` is when the oldest request of the forming batch arrived (``None`` with ``count == 0``; an empty
        batch waits for its first request, which is the caller's blocking read, not this policy).
        """
        if count >= self.batch_size:
            return None
        if count == 0 or oldest is None:
            return float("inf")
        remaining = oldest + self.max_delay_s - now
        return remaining if remaining > 0 else None

    def reason(self, count: int) -> str:
        """Why a batch of ``count`` requests runs once ``wait_s`` said so: full, or its wait is over (``max_delay``
        reached; with ``max_delay == 0``, whatever was queued, the queue having no more)."""
        if count >= self.batch_size:
            return COUNT
        return MAX_DELAY if self.max_delay_s > 0 else EMPTY
