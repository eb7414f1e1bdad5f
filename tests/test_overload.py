"""Callers outrunning the worker: admission at submit (``max_queue_size``) and requests abandoned by their callers.

Real Redis; the queues fill while no worker runs, then a real worker shows what reached the model and what not.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import urllib.request
from types import ModuleType

import pytest
import redis
from celery import signals, states
from prometheus_client.parser import text_string_to_metric_families

import batching
from batching import QueueFull, RequestAbandoned
from batching.publish import Admission
from batching.redis_server import free_port
from batching.store.keys import QueueKeys
from batching.store.lua import script
from tests.waiting import poll_until

pytestmark = pytest.mark.integration


@pytest.fixture
def shop(redis_url: str, rclient: redis.Redis) -> ModuleType:
    module = importlib.import_module("tests.apps.shop")
    for task in (module.bounded, module.predict):
        keys = QueueKeys(task.batching.queue)
        rclient.delete(*keys.lists, keys.stats, keys.abandoned)
    rclient.delete("shop:bounded_ran")
    return module


def waiting(rclient: redis.Redis, task) -> int:
    return sum(int(rclient.llen(key)) for key in QueueKeys(task.batching.queue).lists)


def test_eight_client_threads_race_for_a_bounded_queue_and_exactly_n_get_in(shop, rclient):
    bound = shop.BOUND
    accepted: list[str] = []
    refused: list[QueueFull] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client(n: int) -> None:
        start.wait()
        for i in range(25):  # 200 sends for 40 places
            try:
                # Priorities spread the requests over the queue's lists: the bound counts all of them. No result
                # subscription: Celery's per-thread result consumers would outlive these threads.
                result = shop.bounded.apply_async(kwargs={"x": n * 100 + i}, priority=(i % 3) * 3,
                                                  ignore_result=True)
            except QueueFull as exc:
                with lock:
                    refused.append(exc)
            else:
                with lock:
                    accepted.append(result.id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == bound
    assert len(refused) == 200 - bound
    assert waiting(rclient, shop.bounded) == bound
    assert all(e.depth == bound and e.limit == bound and e.retry_after > 0 for e in refused)
    assert "is full: 40 request(s) waiting, max_queue_size=40" in str(refused[0])
    # what got in is exactly what is queued
    queued = {m for key in QueueKeys(shop.bounded.batching.queue).lists for m in rclient.lrange(key, 0, -1)}
    assert {id_ for id_ in accepted if any(id_.encode() in m for m in queued)} == set(accepted)


def test_submit_many_is_all_or_nothing(shop, rclient):
    bound = shop.BOUND
    shop.bounded.submit_many([{"x": i} for i in range(bound - 3)])
    assert waiting(rclient, shop.bounded) == bound - 3
    with pytest.raises(QueueFull) as raised:
        shop.bounded.submit_many([{"x": i} for i in range(5)])
    assert raised.value.depth == bound - 3
    assert waiting(rclient, shop.bounded) == bound - 3  # not even the three that would have fitted
    results = shop.bounded.submit_many([{"x": i} for i in range(3)])
    assert len(results) == 3 and waiting(rclient, shop.bounded) == bound


def test_a_refused_send_publishes_nothing_and_leaves_no_result_subscription(shop, rclient):
    shop.bounded.submit_many([{"x": i} for i in range(shop.BOUND)])
    before: list[dict] = []
    after: list[dict] = []

    def on_before(headers=None, **kwargs):
        before.append(headers)

    def on_after(headers=None, **kwargs):
        after.append(headers)

    signals.before_task_publish.connect(on_before)
    signals.after_task_publish.connect(on_after)
    try:
        with pytest.raises(QueueFull):
            shop.bounded.delay(x=1)
    finally:
        signals.before_task_publish.disconnect(on_before)
        signals.after_task_publish.disconnect(on_after)
    assert len(before) == 1 and after == []  # Celery built and announced it; it was never published
    task_id = before[0]["id"]
    consumer = shop.app.backend.result_consumer
    assert shop.app.backend.get_key_for_task(task_id) not in consumer.subscribed_to
    assert waiting(rclient, shop.bounded) == shop.BOUND


def test_aio_submit_is_admitted_too(shop, rclient):
    async def fill() -> tuple[int, QueueFull]:
        sent = 0
        try:
            while True:
                await batching.aio.submit(shop.bounded, sent)
                sent += 1
        except QueueFull as exc:
            return sent, exc
        finally:
            await batching.aio.close()

    sent, exc = asyncio.run(fill())
    assert sent == shop.BOUND and exc.depth == shop.BOUND
    assert waiting(rclient, shop.bounded) == shop.BOUND


def test_retry_after_comes_from_the_measured_drain_rate(shop, rclient):
    keys = QueueKeys(shop.bounded.batching.queue)
    admission = Admission(keys, limit=2)
    admit = script(rclient, Admission.SCRIPT)
    rclient.lpush(keys.main, b"a", b"b")  # full

    def refuse(now: float) -> QueueFull:
        # admit.lua's arguments as Admission builds them, with the clock under the test's control
        reply = admit(keys=[keys.stats, *keys.lists], args=[2, now, 1, b"c"])
        with pytest.raises(QueueFull) as raised:
            admission.check(reply, 1)
        return raised.value

    t = 1_000_000.0
    rclient.hset(keys.stats, "requests", 1000)
    assert refuse(t).retry_after == 1.0  # first refusal: no rate measured yet, the default
    rclient.hincrby(keys.stats, "requests", 500)  # the consumers ran 500 requests in the next 2 s: 250/s
    measured = refuse(t + 2.0)
    assert measured.retry_after == pytest.approx(1 / 250)  # one request over the bound, at 250/s
    assert measured.depth == 2
    assert refuse(t + 2.5).retry_after == pytest.approx(1 / 250)  # sampled at most once a second: kept
    assert rclient.hget(keys.stats, "drain:rate") == b"250"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_whose_callers_gave_up_never_run_and_end_revoked(shop, rclient, start_worker):
    backend = shop.app.backend

    async def callers() -> tuple[list, list, list]:
        try:
            cancelled = [await batching.aio.submit(shop.bounded, x=i) for i in range(3)]
            timed_out = [await batching.aio.submit(shop.bounded, x=10 + i) for i in range(2)]
            kept = [await batching.aio.submit(shop.bounded, x=20 + i) for i in range(2)]
            waiters = [asyncio.create_task(batching.aio.wait(r)) for r in cancelled]
            keys = [backend.get_key_for_task(r.id) for r in cancelled]
            while any(n != 1 for _, n in await asyncio.to_thread(rclient.pubsub_numsub, *keys)):
                await asyncio.sleep(0.01)  # every waiter subscribed
            for w in waiters:
                w.cancel()
            for w in waiters:
                with pytest.raises(asyncio.CancelledError):
                    await w
            with pytest.raises(TimeoutError):
                await batching.aio.gather(timed_out, timeout=0.2)
            with pytest.raises(TimeoutError):
                await batching.aio.wait(kept[0], timeout=0.2, abandon=False)
            return cancelled, timed_out, kept
        finally:
            await batching.aio.close()

    cancelled, timed_out, kept = asyncio.run(callers())
    keys = [backend.get_key_for_task(r.id) for r in cancelled + timed_out]
    assert [n for _, n in rclient.pubsub_numsub(*keys)] == [0] * 5  # no subscription left behind
    abandoned = QueueKeys(shop.bounded.batching.queue).abandoned
    assert {m.decode() for m in rclient.zrange(abandoned, 0, -1)} == {r.id for r in cancelled + timed_out}

    port = free_port()
    start_worker("tests.apps.shop", "--pool", "solo",
                 env={"BATCHING_METRICS_PORT": str(port), "BATCHING_METRICS_ADDR": "127.0.0.1"}).ready()
    for r in cancelled + timed_out:
        with pytest.raises(RequestAbandoned, match="its caller stopped waiting"):
            r.get(timeout=30)
        assert r.state == states.REVOKED
    assert [r.get(timeout=30) for r in kept] == [200, 210]
    assert sorted(int(x) for x in rclient.lrange("shop:bounded_ran", 0, -1)) == [20, 21]  # only those ran
    task = (("task", shop.bounded.name),)
    abandoned_total = ("batching_items_total", (("outcome", "abandoned"), *task))

    def counted() -> dict[tuple[str, tuple], float] | None:
        m = scrape(port)
        return m if m.get(abandoned_total) else None

    metrics = poll_until(counted, 10, "the abandoned items in the metrics")
    assert metrics[abandoned_total] == 5
    assert metrics[("batching_items_total", (("outcome", "succeeded"), *task))] == 2


def test_a_request_already_running_when_its_caller_gives_up_is_stored_as_usual(shop, rclient, start_worker):
    start_worker("tests.apps.shop", "--pool", "solo").ready()
    claims = QueueKeys(shop.sleepy.batching.queue).claims

    async def give_up_while_it_runs() -> str:
        try:
            result = await batching.aio.submit(shop.sleepy, x=7)
            while not await asyncio.to_thread(rclient.zcard, claims):
                await asyncio.sleep(0.01)  # claimed: run_batch is sleeping on it
            with pytest.raises(TimeoutError):
                await batching.aio.wait(result, timeout=0.05)
            return result.id
        finally:
            await batching.aio.close()

    task_id = asyncio.run(give_up_while_it_runs())
    assert rclient.zscore(QueueKeys(shop.sleepy.batching.queue).abandoned, task_id) is not None
    assert shop.sleepy.AsyncResult(task_id).get(timeout=10) == 7
