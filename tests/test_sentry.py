"""Sentry's Celery integration, unchanged, on batched tasks: a transaction per item continuing the client's trace,
an error event per failed item, and what the worker holds flushed when it shuts down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

JUDGE = "tests.apps.reported.judge"


# The batching consumers run in the worker's main process whatever the pool: prefork children must not matter.
@pytest.mark.parametrize("pool", [["--pool", "solo"], ["--pool", "prefork", "-c", "1"]], ids=["solo", "prefork"])
def test_transactions_and_events_per_item(redis_url: str, rclient: redis.Redis,
                                          start_worker: Callable[..., Any], pool: list[str]) -> None:
    rclient.delete("reported:worker", "reported:client")
    sent = subprocess.run([sys.executable, "-c", "from tests.apps.reported import client; client()"], cwd=ROOT,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    client = json.loads(sent.stdout)
    fine, bad, worse, bulk = client["ids"]
    from tests.apps.reported import ModelError, crash

    crashed = [crash.delay(x=i) for i in range(3)]  # one batch, one raise: three failed items, one exception
    worker = start_worker("tests.apps.reported", *pool).ready()
    for r in crashed:
        with pytest.raises(ModelError):
            r.get(timeout=30)
    assert worker.stop() == 0  # a warm shutdown: the worker flushes what Sentry holds
    records = [json.loads(raw) for raw in rclient.lrange("reported:worker", 0, -1)]

    transactions = {}
    for record in records:
        event = record["event"]
        if record["type"] == "transaction" and event["transaction"] == JUDGE:
            (span,) = event["spans"]
            transactions[span["data"]["messaging.message.id"]] = (event, span)
    assert set(transactions) == {fine, bad, worse, bulk}, worker.output()
    for task_id, (event, span) in transactions.items():
        assert event["contexts"]["trace"]["op"] == "queue.task.celery"
        assert event["contexts"]["trace"]["trace_id"] == client["trace_id"], task_id  # the client's trace
        assert event["tags"]["celery_task_id"] == task_id
        assert span["op"] == "queue.process" and span["data"]["messaging.destination.name"] == f"batching.{JUDGE}"
    assert "status" not in transactions[fine][1] and transactions[bad][1]["status"] == "internal_error"

    errors = [r["event"] for r in records if r["type"] == "event"
              and r["event"]["exception"]["values"][-1]["mechanism"]["type"] == "celery"]
    by_task = {e["tags"]["celery_task_id"]: e["exception"]["values"][-1]["type"] for e in errors}
    crash_ids = {r.id for r in crashed}
    assert {k: v for k, v in by_task.items() if k not in crash_ids} == {bad: "ValueError", worse: "KeyError"}
    # The batch that raised is one error (one exception instance), tagged with one of its items.
    assert [v for k, v in by_task.items() if k in crash_ids] == ["ModelError"]
    assert len(errors) == 3


def test_errors_only_an_event_per_failed_item_and_no_transactions(redis_url: str, rclient: redis.Redis,
                                                                   start_worker: Callable[..., Any]) -> None:
    rclient.delete("reported:worker")
    from tests.apps.reported import judge

    results = {text: judge.delay(text=text) for text in ("fine", "bad", "worse")}
    worker = start_worker("tests.apps.reported", "--pool", "solo", env={"REPORTED_ERRORS_ONLY": "1"}).ready()
    assert results["fine"].get(timeout=30) == "FINE"
    with pytest.raises(ValueError):
        results["bad"].get(timeout=30)
    with pytest.raises(KeyError):
        results["worse"].get(timeout=30)
    assert worker.stop() == 0
    records = [json.loads(raw) for raw in rclient.lrange("reported:worker", 0, -1)]
    assert [r["type"] for r in records] == ["event", "event"]
    found = {r["event"]["tags"]["celery_task_id"]: r["event"]["exception"]["values"][-1]["type"] for r in records}
    assert found == {results["bad"].id: "ValueError", results["worse"].id: "KeyError"}
