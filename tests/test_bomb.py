"""A compressed message that inflates to 1 GiB: its task fails on the first delivery and the worker's memory stays
flat, because decompression stops at ``max_message_bytes``."""

from __future__ import annotations

import base64
import importlib
import json
import zlib
from pathlib import Path

import pytest
import redis
from celery import states

from batching.errors import MessageError
from batching.store.keys import QueueKeys

pytestmark = pytest.mark.integration

GIB = 1 << 30


def zlib_bomb(inflated: int) -> bytes:
    """A JSON protocol-2 body padded with ``inflated`` bytes of spaces, zlib-compressed in chunks (about 1 MiB)."""
    packer = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    parts = [packer.compress(b'[["x"], {}, {}]')]
    parts += [packer.compress(chunk) for _ in range(inflated // len(chunk))]
    parts.append(packer.flush())
    return b"".join(parts)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_decompression_bomb_fails_its_task_at_once_and_memory_stays_flat(start_worker, rclient: redis.Redis):
    shop = importlib.import_module("tests.apps.shop")
    keys = QueueKeys(shop.picky.batching.queue)
    bomb = zlib_bomb(GIB)
    assert len(bomb) < 2 * (1 << 20)
    # A real compressed message from the client, whose body is then swapped for the bomb.
    victim = shop.picky.apply_async(kwargs={"x": 1}, compression="zlib")
    raw = rclient.rpop(keys.main)
    assert isinstance(raw, bytes)
    envelope = json.loads(raw)
    assert envelope["headers"]["compression"] == "application/x-gzip"
    envelope["body"] = base64.b64encode(bomb).decode()
    rclient.lpush(keys.main, json.dumps(envelope))
    neighbours = [shop.picky.delay(x=i) for i in range(1, 50)]

    worker = start_worker("tests.apps.shop", "--pool", "solo").ready()

    with pytest.raises(MessageError, match="inflates past this task's limit"):
        victim.get(timeout=30)
    assert victim.state == states.FAILURE
    assert [r.get(timeout=30) for r in neighbours] == [2 * i for i in range(1, 50)]
    assert rclient.llen(keys.dead) == 0  # failed on its first delivery, not dead-lettered after crashes
    assert peak_rss_mib(worker.proc.pid) < 400  # the 1 GiB was never inflated
