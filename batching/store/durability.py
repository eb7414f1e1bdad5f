"""What Redis keeps across a restart, and saying so loudly when it kept nothing.

A Redis without persistence loses every queued and claimed message when it restarts; the consumers cannot bring
them back, but they must not be silent about it (the alternative, carrying on as if nothing happened, let a log
claim it had "re-queued" claims that no longer existed).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from .queue import QueueStore


def persistence_warning(client: redis.Redis) -> str | None:
    """A warning if the Redis behind ``client`` keeps nothing on disk (no AOF, no RDB snapshots), else None.

    ``CONFIG GET`` may be disabled (managed Redis): then nothing is said.
    """
    try:
        aof: Any = client.config_get("appendonly")
        rdb: Any = client.config_get("save")
    except redis.RedisError:
        return None
    if aof.get("appendonly") == "no" and not (rdb.get("save") or "").strip():
        return ("the broker Redis keeps nothing on disk (appendonly no, no save points): a restart of it loses every "
                "queued and claimed task; enable appendonly for anything but tests")
    return None


def run_id(client: redis.Redis) -> str:
    """The Redis server's run id: it changes with every restart."""
    info: Any = client.info("server")
    return str(info.get("run_id", "?"))


def record_loss(store: QueueStore) -> dict[str, Any]:
    """Remember, where ``batching status`` reads it, that Redis was found to have lost this queue's data."""
    entry = {"at": store.now(), "run_id": run_id(store.client)}
    store.client.set(store.keys.lost, json.dumps(entry))
    return entry
