"""``batching.aio`` against real Redis and a real worker: the message it sends, and many waiters on one connection."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
import redis
from celery import Celery, signals

import batching
from batching import QueueFull, ResultBackendError
from batching.redis_server import find_redis_server, free_port
from batching.store.keys import QueueKeys
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.shop")


def normalized(raw: bytes) -> str:
    """A queued message with its ids and times replaced, so two sends of the same call compare byte for byte."""
    message = json.loads(raw)
    headers, properties = message["headers"], message["properties"]
    for key in ("id", "root_id"):
        headers[key] = "<id>"
    headers["sent_at"] = 0.0 if "sent_at" in headers else None
    for key in ("correlation_id", "delivery_tag"):
        properties[key] = "<id>"
    return json.dumps(message)


def test_submit_sends_the_bytes_delay_sends_with_the_same_signals(shop, rclient):
    queue = QueueKeys(shop.predict.batching.queue)
    rclient.delete(*queue.lists)
    seen: list[tuple[str, Any]] = []

    def before(headers=None, **kwargs):
        headers["traceparent"] = "00-abc-def-01"  # as OpenTelemetry injects it into the mutable headers
        seen.append(("before", headers["id"]))

    def after(headers=None, **kwargs):
        seen.append(("after", headers["id"]))

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)

    async def send() -> list:
        try:
            return [await batching.aio.submit(shop.predict, "hi", scale=2.0),
                    await batching.aio.submit(shop.add, 2, 3)]
        finally:
            await batching.aio.close()

    try:
        by_delay = [shop.predict.delay(text="hi", scale=2.0), shop.add.delay(2, 3)]
        delayed = [rclient.rpop(queue.main), rclient.rpop("celery")]
        by_aio = asyncio.run(send())
        submitted = [rclient.rpop(queue.main), rclient.rpop("celery")]
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert all(delayed) and all(submitted)
    assert [normalized(r) for r in submitted] == [normalized(r) for r in delayed]
    assert b"00-abc-def-01" in submitted[0]
    ids = [r.id for r in by_delay + by_aio]
    assert seen == [(kind, i) for i in ids for kind in ("before", "after")]


def test_submit_checks_arguments_before_sending(shop, rclient):
    async def bad() -> None:
        try:
            with pytest.raises(TypeError, match="colour"):
                await batching.aio.submit(shop.predict, text="x", colour="red")
            with pytest.raises(TypeError):
                await batching.aio.submit(shop.add, 1)
        finally:
            await batching.aio.close()

    before = rclient.llen(shop.predict.batching.queue)
    asyncio.run(bad())
    assert rclient.llen(shop.predict.batching.queue) == before


def test_wait_and_gather_return_values_and_raise_the_tasks_own_errors(shop, shop_worker):
    async def run() -> None:
        try:
            ok = await batching.aio.submit(shop.picky, 4)
            bad = await batching.aio.submit(shop.picky, x=-2)
            plain = await batching.aio.submit(shop.add, 2, 3)  # an ordinary Celery task works too
            assert await batching.aio.wait(ok, timeout=30) == 8
            with pytest.raises(ValueError, match="negative input -2"):
                await batching.aio.wait(bad, timeout=30)
            values = await batching.aio.gather([ok, bad, plain], timeout=30, propagate=False)
            assert values[0] == 8 and values[2] == 5
            assert type(values[1]) is ValueError and str(values[1]) == "negative input -2"
            with pytest.raises(ValueError):
                await batching.aio.gather([ok, bad], timeout=30)
            assert await batching.aio.gather([], timeout=1) == []
        finally:
            await batching.aio.close()

    asyncio.run(run())


def connections_of_this_process(client: redis.Redis) -> list[dict[str, Any]]:
    """CLIENT LIST entries whose socket belongs to this process."""
    client.ping()  # connected before this process's sockets are listed
    ours = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp") if c.raddr}
    return [c for c in client.client_list() if c["addr"] in ours]


def test_thousands_of_waiters_share_one_connection_and_cost_a_few_kib_each(redis_url, rclient, start_worker):
    waiters_app = importlib.import_module("tests.apps.waiters")  # no worker serves it until the test starts one
    n = 3000
    per_waiter: list[float] = []

    async def run() -> list[Any]:
        try:
            results = await asyncio.gather(*(batching.aio.submit(waiters_app.upper, text=f"t{i}") for i in range(n)))
            before_waiting = len(await asyncio.to_thread(connections_of_this_process, rclient))
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            waiters = [asyncio.create_task(batching.aio.wait(r, timeout=120)) for r in results]
            while True:  # every waiter subscribed, nothing ready: no worker yet
                subscribed = await asyncio.to_thread(connections_of_this_process, rclient)
                if sum(int(c["sub"]) for c in subscribed) == n:
                    break
                await asyncio.sleep(0.05)
            per_waiter.append((tracemalloc.get_traced_memory()[0] - before) / n)
            tracemalloc.stop()
            pubsub = [c for c in subscribed if int(c["sub"])]
            assert len(pubsub) == 1 and int(pubsub[0]["sub"]) == n  # one connection holds every subscription
            # waiting added that connection and at most one for the lookups (which may reuse an idle one), whatever
            # the number of waiters
            assert len(subscribed) <= before_waiting + 2, [(c["cmd"], c["age"], c["sub"]) for c in subscribed]
            await asyncio.to_thread(lambda: start_worker("tests.apps.waiters", "--pool", "solo").ready())
            return await asyncio.gather(*waiters)
        finally:
            await batching.aio.close()

    values = asyncio.run(run())
    assert values == [f"T{i}" for i in range(n)]
    print(f"{per_waiter[0]:.0f} bytes per waiter")  # quoted in the README
    assert per_waiter[0] < 8192, f"{per_waiter[0]:.0f} bytes per waiter"  # a few KiB: task, future, subscription
    assert not any(int(c["sub"]) for c in connections_of_this_process(rclient))  # everything unsubscribed


def test_a_result_published_between_subscribing_and_looking_is_not_missed(shop, rclient):
    # The listener looks results up (MGET) once Redis has confirmed the subscription. Here a result is published
    # — never stored — right before that lookup, and another is stored — never published — before the wait
    # starts: the first can only arrive through the subscription, the second only through the lookup.
    backend = shop.app.backend
    published, stored = shop.app.AsyncResult("between-1"), shop.app.AsyncResult("before-1")
    payload = {"status": "SUCCESS", "result": 42, "traceback": None, "children": [], "date_done": None,
               "task_id": "between-1"}
    rclient.set(backend.get_key_for_task(stored.id), json.dumps({**payload, "task_id": "before-1", "result": 7}))

    async def run() -> list[Any]:
        try:
            listener = batching.aio._state().listener(shop.app, backend)
            real_mget = listener.client.mget

            async def publish_then_mget(keys: list[bytes]) -> list[Any]:
                for key in keys:
                    if key == backend.get_key_for_task(published.id):
                        await listener.client.publish(key, json.dumps(payload))
                return await real_mget(keys)

            listener.client.mget = publish_then_mget  # type: ignore[method-assign,assignment]
            return await batching.aio.gather([published, stored], timeout=10)
        finally:
            await batching.aio.close()

    assert asyncio.run(run()) == [42, 7]
    assert rclient.get(backend.get_key_for_task(published.id)) is None  # it really was only published


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        wait_until(lambda: _pings(url), 10, "redis-server to start")

    def restart() -> None:
        procs[-1].terminate()
        procs[-1].wait(10)
        start()

    start()
    yield url, restart
    for p in procs:
        p.terminate()
        p.wait(10)


def _pings(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_waiters_ride_out_a_redis_restart_and_find_results_stored_meanwhile(restartable_redis):
    url, restart = restartable_redis
    app = Celery("restart", broker=url, backend=url, set_as_current=False)
    results = [app.AsyncResult(f"restart-{i}") for i in range(200)]
    probe = redis.Redis.from_url(url)

    def store(which: range) -> None:
        for i in which:
            app.backend.store_result(results[i].id, i, "SUCCESS")

    def subscriptions() -> int:
        return sum(int(c["sub"]) for c in connections_of_this_process(probe))

    async def run() -> list[Any]:
        try:
            waiting = asyncio.create_task(batching.aio.gather(results, timeout=60))
            while await asyncio.to_thread(subscriptions) != 200:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(store, range(0, 50))  # before the restart: published to the live subscription
            await asyncio.to_thread(restart)
            # Stored (and published to nobody) before the listener is back: found by its lookup after resubscribing.
            await asyncio.to_thread(store, range(50, 150))
            while await asyncio.to_thread(subscriptions) < 50:
                await asyncio.sleep(0.02)  # resubscribed
            await asyncio.to_thread(store, range(150, 200))  # after: published again
            return await waiting
        finally:
            await batching.aio.close()

    try:
        assert asyncio.run(run()) == list(range(200))
        assert subscriptions() == 0
    finally:
        probe.close()
        app.backend.client.connection_pool.disconnect()


def test_a_result_backend_that_is_not_redis_is_refused_by_name(redis_url):
    app = Celery("rpc", broker=redis_url, backend="rpc://", set_as_current=False)

    async def run() -> None:
        try:
            with pytest.raises(ResultBackendError, match=r"celery\.backends\.rpc\.RPCBackend \('rpc://'\)"):
                await batching.aio.wait(app.AsyncResult("x"), timeout=1)
        finally:
            await batching.aio.close()

    asyncio.run(run())


def test_queue_full_is_importable_from_the_package_and_the_module() -> None:
    assert batching.QueueFull is QueueFull is batching.aio.QueueFull
