"""Batched tasks in Celery's canvas: links, chains, groups, chords, errbacks and per-item retries."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from celery import chain, chord, group, states

from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.shop")


def test_link_callback_gets_the_result_and_is_a_child(shop, shop_worker):
    r = shop.predict.apply_async(kwargs={"text": "linked"}, link=shop.postprocess.s())
    assert r.get(timeout=30) == "LINKED"
    assert len(r.children) == 1
    assert r.children[0].get(timeout=30) == "<LINKED>"


def test_chain_from_a_batched_task(shop, shop_worker):
    res = (shop.predict.s(text="chained") | shop.postprocess.s())()
    assert res.get(timeout=30) == "<CHAINED>"
    assert res.parent.get(timeout=30) == "CHAINED"


def test_chain_into_a_batched_task(shop, shop_worker):
    res = chain(shop.add.s(2, 3), shop.picky.s())()
    assert res.get(timeout=30) == 10


def test_group_of_batched_tasks(shop, shop_worker):
    assert group(shop.predict.s(text=t) for t in "abcdefgh")().get(timeout=30) == list("ABCDEFGH")


def test_chord_with_batched_tasks_in_the_header(shop, shop_worker):
    res = chord((shop.picky.s(x=i) for i in range(10)), shop.collect.s())()
    assert res.get(timeout=30) == [i * 2 for i in range(10)]


def test_link_error_errback_runs_for_a_failed_request(shop, shop_worker, rclient):
    rclient.delete("shop:errbacks")
    r = shop.picky.apply_async(kwargs={"x": -5}, link_error=shop.on_error.s())
    with pytest.raises(ValueError):
        r.get(timeout=30)
    wait_until(lambda: rclient.llen("shop:errbacks"), 30, "the errback to run")
    assert rclient.lrange("shop:errbacks", 0, -1) == [f"{r.id}:ValueError".encode()]


def test_autoretry_requeues_only_the_failed_item_and_the_client_sees_retry(shop, shop_worker, rclient):
    rclient.delete("shop:flaky")
    r = shop.flaky.delay(x="a")
    seen = set()

    def succeeded() -> bool:
        state = r.state
        seen.add(state)
        return state == states.SUCCESS

    wait_until(succeeded, 30, "the retried task to succeed", interval=0.01)
    assert r.get(timeout=5) == "ok:a"
    assert states.RETRY in seen
    assert int(rclient.hget("shop:flaky", "a")) == 2


def test_autoretry_gives_up_after_max_retries(shop, shop_worker):
    r = shop.hopeless.delay(x="z")
    with pytest.raises(shop.Flaky, match="never works: z"):
        r.get(timeout=30)
    assert r.state == states.FAILURE
