"""OpenTelemetry's Celery instrumentation, unchanged, on batched tasks: a worker span per item in the client's trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.conftest import ROOT, poll_until

pytestmark = pytest.mark.integration

TASK = "tests.apps.traced.shout"


# The batching consumers run in the worker's main process whatever the pool: prefork children must not matter.
@pytest.mark.parametrize("pool", [["--pool", "solo"], ["--pool", "prefork", "-c", "1"]], ids=["solo", "prefork"])
def test_a_consumer_span_per_item_in_the_clients_trace_and_a_linked_batch_span(
    redis_url: str, rclient: redis.Redis, start_worker: Callable[..., Any], pool: list[str]
) -> None:
    rclient.delete("traced:spans", f"batching:stats:batching.{TASK}")
    # Everything is queued before the worker starts, so one batch holds the traced items and an untraced one.
    sent = subprocess.run([sys.executable, "-c", "from tests.apps.traced import client; client()"], cwd=ROOT,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    client = json.loads(sent.stdout)
    from tests.apps.traced import shout  # this process is not instrumented: its message carries no trace context

    untraced = shout.delay(text="plain").id
    worker = start_worker("tests.apps.traced", *pool).ready()

    def consumer_spans() -> dict[str, dict[str, Any]] | None:
        spans = [json.loads(raw) for raw in rclient.lrange("traced:spans", 0, -1)]
        found = {s["attributes"].get("messaging.message.id"): s for s in spans if s["kind"] == "CONSUMER"}
        return found if len(found) >= 4 else None

    found = poll_until(consumer_spans, 30, "a consumer span per item", detail=worker.output)
    spans = [json.loads(raw) for raw in rclient.lrange("traced:spans", 0, -1)]
    producers = {s["attributes"]["messaging.message.id"]: s for s in spans if s["kind"] == "PRODUCER"}
    hello, bad, bulk = client["ids"]
    for task_id in (hello, bad, bulk):
        span = found[task_id]
        assert span["name"] == f"run/{TASK}"
        assert span["trace_id"] == client["trace_id"]
        assert span["parent"] == producers[task_id]["span_id"]  # the publish span of its own message
        assert span["attributes"]["celery.task_name"] == TASK
        assert span["attributes"]["messaging.destination"] == f"batching.{TASK}"
    assert (found[hello]["status"], found[hello]["attributes"]["celery.state"]) == ("UNSET", "SUCCESS")
    assert (found[bad]["status"], found[bad]["exceptions"]) == ("ERROR", ["ValueError"])
    assert found[bad]["attributes"]["celery.state"] == "FAILURE"
    batches = poll_until(lambda: rclient.hgetall(f"batching:stats:batching.{TASK}"), 10, "the batch stats")
    assert batches[b"size:4"] == b"1"  # all four items ran as one batch
    # The untraced item starts a trace of its own: it is not a child of its neighbours' spans in the batch.
    assert found[untraced]["parent"] is None and found[untraced]["trace_id"] != client["trace_id"]
    # The batch span (OTEP 0220): linked to every item's span; the model's own span is its child.
    (batch,) = [s for s in spans if s["name"] == f"run_batch/{TASK}"]
    assert sorted(batch["links"]) == sorted(found[i]["span_id"] for i in (hello, bad, bulk, untraced))
    assert batch["attributes"]["batching.batch_size"] == 4
    (model,) = [s for s in spans if s["name"] == "model-call"]
    assert (model["parent"], model["trace_id"]) == (batch["span_id"], batch["trace_id"])
    assert "no existing span found" not in worker.output() and "Failed to detach context" not in worker.output()
