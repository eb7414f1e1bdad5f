"""End to end: clients call batched tasks one request at a time; a real ``celery worker`` runs them in batches."""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from types import ModuleType
from typing import cast

import pytest
import redis
from celery import group, states
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult, ResultSet

from batching.errors import BatchResultError, MissingArgumentError, UnexpectedArgumentError
from batching.store.keys import QueueKeys
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.shop")


def sizes(client: redis.Redis, task, *, requests: int | None = None) -> dict[int, int]:
    """The task's batch-size histogram; with ``requests``, once it counts that many (claims finish just after the
    results are published, so the last batch may still be on its way)."""
    key = QueueKeys(task.batching.queue).stats
    if requests is not None:
        wait_until(lambda: int(client.hget(key, "requests") or 0) >= requests, 10, f"{requests} requests counted",
                   interval=0.01)
    stats = cast(dict[bytes, bytes], client.hgetall(key))  # the client does not decode responses
    return {int(k[5:]): int(v) for k, v in stats.items() if k.startswith(b"size:")}


def test_concurrent_delays_come_back_right_and_batched(shop, shop_worker, rclient):
    before = sizes(rclient, shop.predict)
    before_requests = int(rclient.hget(QueueKeys(shop.predict.batching.queue).stats, "requests") or 0)
    texts = [f"item-{i}-{uuid.uuid4().hex[:6]}" for i in range(320)]
    results: dict[int, AsyncResult] = {}

    def submit(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            results[i] = shop.predict.delay(text=texts[i]) if i % 3 else shop.predict.delay(texts[i], 2.0)

    threads = [threading.Thread(target=submit, args=(k * 40, (k + 1) * 40)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Celery's Redis result consumer is per thread: collect through this thread's own AsyncResults.
    collected = ResultSet([shop.app.AsyncResult(results[i].id) for i in range(len(texts))])
    values = collected.get(timeout=60)
    assert values == [t.upper() if i % 3 else f"{t.upper()}*2.0" for i, t in enumerate(texts)]
    assert all(r.state == states.SUCCESS for r in collected.results)

    after = sizes(rclient, shop.predict, requests=before_requests + len(texts))
    ran = {n: after.get(n, 0) - before.get(n, 0) for n in after}
    assert sum(n * c for n, c in ran.items()) == len(texts)
    assert max(n for n, c in ran.items() if c) > 1, f"never batched: {ran}"
    assert max(ran) <= 16


def test_per_item_errors_fail_alone_with_their_type(shop, shop_worker):
    rs = [shop.picky.delay(x=x) for x in (1, -2, 3, -4, 5)]
    assert [r.get(timeout=30) for r in rs[::2]] == [2, 6, 10]
    for r, x in zip(rs[1::2], (-2, -4), strict=True):
        with pytest.raises(ValueError, match=f"negative input {x}"):
            r.get(timeout=30)
        assert r.state == states.FAILURE


def test_whole_batch_error_reaches_every_request_with_its_type(shop, shop_worker):
    rs = [shop.explode.delay(x=i) for i in range(5)]
    for r in rs:
        with pytest.raises(shop.ModelError, match="model crashed on a batch of"):
            r.get(timeout=30)


def test_wrong_result_count_fails_the_batch_saying_both_lengths(shop, shop_worker):
    r = shop.short.delay(x=1)
    with pytest.raises(BatchResultError, match=r"returned 0 results for a batch of 1 requests"):
        r.get(timeout=30)


def test_client_rejects_bad_calls_before_sending(shop):
    with pytest.raises(TypeError, match="missing required argument"):
        shop.predict.delay()
    with pytest.raises(TypeError, match=r"unexpected argument.*colour"):
        shop.predict.delay(text="x", colour="red")
    with pytest.raises(TypeError, match="multiple values"):
        shop.predict.delay("x", text="y")
    with pytest.raises(TypeError, match="takes 3 positional"):
        shop.predict.delay("a", 1.0, "", "extra")


def test_send_task_by_name_with_missing_argument_fails_alone(shop, shop_worker):
    bad = shop.app.send_task(shop.predict.name, kwargs={"scale": 3.0})
    unknown = shop.app.send_task(shop.predict.name, kwargs={"text": "a", "colour": "red"})
    good = shop.app.send_task(shop.predict.name, args=["ok"])
    assert good.get(timeout=30) == "OK"
    with pytest.raises(MissingArgumentError, match=r"missing required argument.*text"):
        bad.get(timeout=30)
    with pytest.raises(UnexpectedArgumentError, match="colour"):
        unknown.get(timeout=30)


def test_falsy_defaults_are_defaults_not_missing(shop, shop_worker):
    rs = [shop.counting.delay(text="a"), shop.counting.delay(text="b", flag=True, limit=5, tag="t")]
    assert [r.get(timeout=30) for r in rs] == [
        {"text": "a", "flag": False, "limit": 0, "tag": None},
        {"text": "b", "flag": True, "limit": 5, "tag": "t"},
    ]


def test_model_loads_once_per_worker_process_and_never_in_the_client(shop, shop_worker, rclient):
    assert sorted(shop.counting.delay(text=str(i)).get(timeout=30)["text"] for i in range(3)) == ["0", "1", "2"]
    group(shop.counting.s(text=str(i)) for i in range(40))().get(timeout=30)
    loads = {int(pid): int(n) for pid, n in rclient.hgetall("shop:model_loads").items()}
    assert loads == {shop_worker.proc.pid: 1}


def test_client_blocked_in_get_before_the_worker_starts_wakes_up(shop, start_worker):
    r = shop.predict.delay(text="early")
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(r.get(timeout=60)))
    waiter.start()
    worker = start_worker("tests.apps.shop", "--pool", "solo", "-Q", "nothing-else")
    waiter.join(60)
    assert got == ["EARLY"], worker.output()


def test_ordinary_task_in_the_same_worker_still_works(shop, shop_worker):
    assert shop.add.delay(2, 3).get(timeout=30) == 5


def test_group_and_result_set_of_batched_tasks(shop, shop_worker):
    res = group(shop.predict.s(text=t) for t in ("x", "y", "z"))()
    assert res.get(timeout=30) == ["X", "Y", "Z"]
    assert res.successful()


def test_expired_task_is_revoked_not_run(shop, shop_worker):
    r = shop.predict.apply_async(kwargs={"text": "late"}, expires=-1)
    with pytest.raises(TaskRevokedError, match="expired"):
        r.get(timeout=30)
    assert r.state == states.REVOKED


def test_countdown_holds_the_task_until_due(shop, shop_worker):
    sent = time.time()
    r = shop.predict.apply_async(kwargs={"text": "later"}, countdown=1.5)
    assert r.get(timeout=30) == "LATER"
    assert r.date_done.timestamp() >= sent + 1.5


def test_priority_messages_are_served(shop, shop_worker):
    rs = [shop.predict.apply_async(kwargs={"text": f"p{p}"}, priority=p) for p in (0, 3, 9)]
    assert [r.get(timeout=30) for r in rs] == ["P0", "P3", "P9"]


def test_normal_consumer_does_not_take_batch_queue_messages(shop, start_worker, rclient):
    # Even when told to consume the batch queue with -Q, the worker's normal consumer leaves it to the batcher.
    worker = start_worker("tests.apps.shop", "--pool", "solo", "-Q", f"celery,{shop.predict.batching.queue}")
    worker.ready()
    assert shop.predict.delay(text="once").get(timeout=30) == "ONCE"
    assert "Task shop.predict[" not in worker.output()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_any_pool_serves_batched_and_ordinary_tasks(shop, start_worker, pool):
    worker = start_worker("tests.apps.shop", "--pool", pool, "-c", "2").ready()
    rs = [shop.predict.delay(text=f"{pool}{i}") for i in range(40)]
    assert [r.get(timeout=30) for r in rs] == [f"{pool.upper()}{i}" for i in range(40)]
    assert shop.add.delay(20, 22).get(timeout=30) == 42
    assert f"batching {shop.predict.name}: consuming queue" in worker.output()
