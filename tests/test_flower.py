"""Batched tasks in a real Flower: the events a batching consumer sends show up like any task's."""

from __future__ import annotations

import base64
import importlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from batching.redis_server import free_port
from tests.conftest import ROOT
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration
pytest.importorskip("flower")

AUTH = "admin:s3cret"


def fetch(url: str, auth: str | None = AUTH) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def flower_tasks(base: str) -> dict:
    """Flower's tasks by id; empty while its API does not answer."""
    status, body = fetch(f"{base}/api/tasks?limit=1000")
    return json.loads(body) if status == 200 else {}


@pytest.fixture
def flower(redis_url: str, tmp_path: Path):
    port = free_port()
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.shop", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--basic-auth={AUTH}", "--persistent=False"],
            cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower did not start:\n{log.read_text()}")
        return fetch(f"{base}/healthcheck", None)[0] == 200

    try:
        wait_until(healthy, 30, "flower to start", interval=0.1, detail=log.read_text)
    except AssertionError:
        proc.kill()
        raise
    yield base
    proc.terminate()
    proc.wait(10)


def test_batched_tasks_appear_in_flower_with_their_details(redis_url, flower, start_worker):
    shop = importlib.import_module("tests.apps.shop")
    worker = start_worker("tests.apps.shop", "--pool", "solo", "-E").ready()
    assert fetch(f"{flower}/api/tasks", None)[0] == 401, "basic auth must protect the API"

    ok = [shop.predict.delay(text=f"flower{i}") for i in range(5)]
    bad = shop.picky.delay(x=-1)
    assert [r.get(timeout=30) for r in ok] == [f"FLOWER{i}" for i in range(5)]
    with pytest.raises(ValueError):
        bad.get(timeout=30)

    wanted = {r.id for r in ok} | {bad.id}

    def ours_settled() -> dict | None:
        tasks = flower_tasks(flower)
        settled = wanted <= tasks.keys() and all(tasks[i].get("state") in ("SUCCESS", "FAILURE") for i in wanted)
        return tasks if settled else None

    tasks = poll_until(
        ours_settled, 30, "Flower to show our tasks settled", interval=0.2,
        detail=lambda: f"Flower saw {len(flower_tasks(flower))} tasks; worker log:\n{worker.output()[-2000:]}",
    )
    assert wanted <= tasks.keys(), f"Flower saw {len(tasks)} tasks, not ours; worker log:\n{worker.output()[-2000:]}"
    for r in ok:
        t = tasks[r.id]
        assert t["name"] == shop.predict.name
        assert t["state"] == "SUCCESS"
        assert "flower" in t["kwargs"]
        assert t["worker"].startswith("w")  # the worker's own node name
        assert t["received"] and t["started"] and t["runtime"] is not None
        assert t["result"] == repr(r.get())
    failed = tasks[bad.id]
    assert failed["state"] == "FAILURE"
    assert "negative input -1" in failed["exception"]


def test_enable_events_at_runtime_turns_batched_task_events_on(redis_url, flower, start_worker):
    shop = importlib.import_module("tests.apps.shop")
    start_worker("tests.apps.shop", "--pool", "solo").ready()  # no -E
    before = shop.predict.delay(text="quiet")
    assert before.get(timeout=30) == "QUIET"
    replies = shop.app.control.enable_events(reply=True, timeout=5)
    assert replies, "no worker answered enable_events"
    after = shop.predict.delay(text="loud")
    assert after.get(timeout=30) == "LOUD"

    def with_after() -> dict | None:
        tasks = flower_tasks(flower)
        return tasks if after.id in tasks else None

    tasks = poll_until(with_after, 30, "Flower to show the task sent after enable_events", interval=0.2)
    assert after.id in tasks
    assert before.id not in tasks, "events were sent although task events were off"
