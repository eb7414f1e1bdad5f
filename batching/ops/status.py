"""``queue_status``: a snapshot of a batched task's queue, on the app's own broker settings."""

from __future__ import annotations

from typing import Any

from ..store.queue import QueueStore
from ..store.snapshot import QueueStatus, status_of


def queue_status(task: Any, *, now: float | None = None) -> QueueStatus:
    """Snapshot of a batched task's queue (see ``QueueStatus``); raises ``BrokerError`` if Redis cannot be used."""
    store, connection = QueueStore.open(task.app, task.batching)
    try:
        if now is None:
            store.sync_clock()  # consumers' liveness and message ages by Redis's clock, as the consumers judge them
        return status_of(store, task.name, now=now)
    finally:
        connection.release()
