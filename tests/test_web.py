"""The HTTP front (tasks/web.py) against real Redis and a real ``celery worker``: values, 422, 429, 502, 504, healthz,
and a client that goes away. The overload tests run it under a real uvicorn."""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx2
import pytest
import redis
from celery import Celery, states
from fastapi.testclient import TestClient
from pydantic import BaseModel

from batching import RequestAbandoned
from batching.redis_server import free_port
from batching.store.keys import QueueKeys
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


class XRequest(BaseModel):
    x: int


def never_runs(text: str, scale: float = 1.0) -> None:
    """The body of tasks defined on throwaway apps in this module; no worker serves them."""


@pytest.fixture(scope="module")
def web(redis_url: str) -> ModuleType:
    # tasks reads REDIS_URL when it first connects: import it only once the session's Redis is known.
    return importlib.import_module("tasks.web")


@pytest.fixture
def client(web):
    with TestClient(web.app) as c:  # the context runs the lifespan (Redis clients, closed at the end)
        yield c


def test_predict_returns_the_models_value(web, client, start_worker):
    from tasks.model import SentimentModel

    start_worker("tasks", "--pool", "solo").ready()
    model = SentimentModel()
    for body, want in (
        ({"text": "great product, love it", "scale": 2.0}, model.run("great product, love it", 2.0)),
        ({"text": "awful and broken"}, model.run("awful and broken")),
    ):
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["result"] == pytest.approx(want, abs=1e-5)
        assert uuid.UUID(got["task_id"])
        assert web.predict.AsyncResult(got["task_id"]).get(timeout=10) == got["result"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text"),
        ({"text": 3}, "text"),
        ({"text": "ok", "scale": "big"}, "scale"),
        ({"text": "ok", "colour": 1}, "colour"),
    ],
)
def test_bad_body_is_422_naming_the_field(client, body, field):
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert [e["loc"][-1] for e in response.json()["detail"]] == [field]


def test_worker_side_failure_is_502_with_its_error(web, redis_url, start_worker):
    # The example model has no input that fails, so this serves the shop test app's ``picky`` task, which fails
    # negative inputs on the worker, through the same create_app and a real worker: nothing is patched.
    shop = importlib.import_module("tests.apps.shop")
    start_worker("tests.apps.shop", "--pool", "solo").ready()
    with TestClient(web.create_app(shop.picky, XRequest)) as c:
        ok = c.post("/predict", json={"x": 3})
        failed = c.post("/predict", json={"x": -2})
    assert ok.status_code == 200 and ok.json()["result"] == 6
    assert failed.status_code == 502
    detail = failed.json()["detail"]
    assert detail["state"] == "FAILURE"
    assert detail["error"] == "ValueError: negative input -2"
    assert uuid.UUID(detail["task_id"])


def test_no_result_in_time_is_504_and_the_loop_keeps_serving(web, redis_url, rclient):
    # A task on a queue no worker consumes never answers; while its request waits, /healthz must still answer.
    nobody = Celery("nobody", broker=redis_url, backend=redis_url)
    queue = f"tests-web-nobody-{uuid.uuid4().hex[:8]}"
    idle = nobody.task(never_runs, name="tests.web.nobody", queue=queue)
    waited: list = []
    try:
        with TestClient(web.create_app(idle, timeout_s=5.0)) as c:
            waiter = threading.Thread(target=lambda: waited.append(c.post("/predict", json={"text": "hello?"})))
            waiter.start()
            while waiter.is_alive() and not rclient.llen(queue):  # the request has been sent and is now waiting
                waiter.join(0.01)
            assert c.get("/healthz").status_code == 200
            assert waiter.is_alive(), "the waiting request should still be waiting: /healthz was not served meanwhile"
            waiter.join(30)
    finally:
        rclient.delete(queue)
    (response,) = waited
    assert response.status_code == 504
    assert response.json()["detail"]["error"] == "no result within 5s"
    assert uuid.UUID(response.json()["detail"]["task_id"])


def test_healthz_is_ok_with_redis_and_503_without(web, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    dead = Celery("dead", broker=dead_url, backend=dead_url)
    with TestClient(web.create_app(dead.task(never_runs, name="tests.web.dead"))) as c:
        response = c.get("/healthz")
    assert response.status_code == 503
    assert "redis" in response.json()["detail"]


@pytest.fixture
def bounded_web(redis_url: str, rclient: redis.Redis, tmp_path: Path) -> Iterator[tuple[str, ModuleType]]:
    """``tests.apps.webapp`` (the example app on the shop's bounded task) under a real uvicorn; no worker yet."""
    shop = importlib.import_module("tests.apps.shop")
    keys = QueueKeys(shop.bounded.batching.queue)
    rclient.delete(*keys.lists, keys.stats, keys.abandoned, "shop:bounded_ran")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.apps.webapp:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, stdout=out, stderr=subprocess.STDOUT,
        )

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"uvicorn exited:\n{log.read_text()}")
        try:
            return httpx2.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    wait_until(up, 30, "uvicorn to serve /healthz", interval=0.05, detail=log.read_text)
    yield url, shop
    proc.terminate()
    proc.wait(30)


def test_overload_is_429_with_retry_after_and_the_timed_out_requests_never_run(bounded_web, rclient, start_worker):
    url, shop = bounded_web
    n = 100

    async def flood() -> list[httpx2.Response]:
        limits = httpx2.Limits(max_connections=n)
        async with httpx2.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.post("/predict", json={"x": i}) for i in range(n)))

    responses = asyncio.run(flood())
    assert Counter(r.status_code for r in responses) == {504: shop.BOUND, 429: n - shop.BOUND}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["detail"]["depth"] == shop.BOUND
    timed_out = [r.json()["detail"]["task_id"] for r in responses if r.status_code == 504]
    keys = QueueKeys(shop.bounded.batching.queue)
    assert {m.decode() for m in rclient.zrange(keys.abandoned, 0, -1)} == set(timed_out)  # all abandoned
    assert sum(int(rclient.llen(k)) for k in keys.lists) == shop.BOUND  # nothing piled up past the bound

    start_worker("tests.apps.shop", "--pool", "solo").ready()
    for task_id in timed_out:
        result = shop.bounded.AsyncResult(task_id)
        with pytest.raises(RequestAbandoned):
            result.get(timeout=30)
        assert result.state == states.REVOKED
    assert rclient.llen("shop:bounded_ran") == 0  # none reached the model


def test_a_client_that_goes_away_abandons_its_request(bounded_web, rclient, start_worker):
    url, shop = bounded_web
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{url}/predict", json={"x": 5}, timeout=0.5)  # gives up and closes its connection
    abandoned = QueueKeys(shop.bounded.batching.queue).abandoned
    (task_id,) = poll_until(lambda: rclient.zrange(abandoned, 0, -1), 10, "the request to be abandoned")
    start_worker("tests.apps.shop", "--pool", "solo").ready()
    result = shop.bounded.AsyncResult(task_id.decode())
    with pytest.raises(RequestAbandoned):
        result.get(timeout=30)
    assert rclient.llen("shop:bounded_ran") == 0
