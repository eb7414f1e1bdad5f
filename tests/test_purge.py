"""Purging batch queues as a user does it: a real ``celery purge`` and a real ``batching purge`` subprocess, no
worker, against the session's real Redis."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
import redis

from batching.store.keys import QueueKeys
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

APP = "tests.apps.controlled"
GATED, ECHO = QueueKeys("batching.ctl.gated"), QueueKeys("batching.ctl.echo")


@pytest.fixture
def ctl(redis_url: str, rclient: redis.Redis) -> Iterator[ModuleType]:
    rclient.delete(*GATED.lists, *ECHO.lists, GATED.delayed, GATED.claims)
    yield importlib.import_module(APP)
    rclient.delete(*GATED.lists, *ECHO.lists, GATED.delayed, GATED.claims)


def run(redis_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def depth(rclient: redis.Redis, keys: QueueKeys) -> list[int]:
    return [int(rclient.llen(k)) for k in keys.lists]


def queue_some(ctl: ModuleType) -> None:
    for i in range(3):
        ctl.gated.delay(x=i)
    ctl.gated.apply_async(kwargs={"x": 9}, priority=9)  # another of the queue's priority lists
    ctl.echo.delay(x="stays")


def test_celery_purge_empties_the_batch_queues_too(ctl, redis_url, rclient):
    queue_some(ctl)
    assert sum(depth(rclient, GATED)) == 4 and sum(1 for n in depth(rclient, GATED) if n) == 2
    done = run(redis_url, "celery", "-A", APP, "purge", "-f")
    assert done.returncode == 0, done.stderr
    assert "Purged" in done.stdout
    assert sum(depth(rclient, GATED)) == 0 and sum(depth(rclient, ECHO)) == 0


def test_batching_purge_empties_one_task_queue_and_its_delayed_messages_and_keeps_claims(ctl, redis_url, rclient):
    queue_some(ctl)
    rclient.zadd(GATED.delayed, {b"a message waiting for its ETA": time.time() + 600})
    rclient.zadd(GATED.claims, {"a-running-claim": time.time() + 600})

    refused = run(redis_url, "batching.cli", "purge", "-A", APP, "--task", "gated")
    assert refused.returncode == 2 and "without --yes" in refused.stderr
    assert sum(depth(rclient, GATED)) == 4

    done = run(redis_url, "batching.cli", "purge", "-A", APP, "--task", "gated", "--yes")
    assert done.returncode == 0, done.stderr
    assert "purged 4 queued and 1 delayed message(s) of ctl.gated" in done.stdout
    assert sum(depth(rclient, GATED)) == 0 and rclient.zcard(GATED.delayed) == 0
    assert rclient.zscore(GATED.claims, "a-running-claim") is not None  # claimed batches are kept
    assert sum(depth(rclient, ECHO)) == 1  # other tasks' queues are untouched
