"""Cost budgets and length bucketing (issue 12 parts 1 and 2): ``cost=``, ``max_batch_cost=``, ``padded=``,
``bucket=``, ``CostTooLarge``.

The packing rules are checked as pure functions; everything a user would see runs on a real Redis under a real
``celery worker``: what ``run_batch`` was given (the models record each batch), task states and exception types.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from typing import Any

import orjson
import pytest
from celery import Celery, states
from hypothesis import given, settings
from hypothesis import strategies as st

import batching
from batching import ConfigurationError, CostError, CostTooLarge, batched
from batching.cost import COST_HEADER, CostSpec
from batching.merge import CallSpec
from batching.worker.packing import bucketed, in_order
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.timeout(120)


def _spec(fn=lambda text: len(text), **options) -> CostSpec:
    def model(text, scale=2):
        return text

    built = CostSpec.build("t.model", fn, CallSpec.from_callable(model), **options)
    assert built is not None
    return built


# -- the cost function and its checks ---------------------------------------------------------------------------


def test_the_cost_function_gets_the_arguments_it_names_with_defaults_applied():
    seen = []

    def cost(text, scale):
        seen.append((text, scale))
        return len(text) * scale

    spec = _spec(cost)
    assert spec.of({"text": "abc"}) == 6.0
    assert seen == [("abc", 2)]
    every = _spec(lambda **kw: sorted(kw.items()) and kw["scale"])
    assert every.of({"text": "a", "scale": 5}) == 5.0


def test_an_unusable_cost_is_a_clear_error():
    assert _spec(lambda text: len(text), max_batch_cost=10).of({"text": "x" * 10}) == 10.0
    with pytest.raises(CostTooLarge, match=r"costs 11, more than max_batch_cost=10") as raised:
        _spec(lambda text: len(text), max_batch_cost=10).of({"text": "x" * 11})
    assert (raised.value.cost, raised.value.limit) == (11.0, 10.0)
    assert isinstance(raised.value, CostError) and isinstance(raised.value, ValueError)
    with pytest.raises(CostError, match="the cost function raised ZeroDivisionError"):
        _spec(lambda text: 1 / 0).of({"text": "a"})
    for junk, why in ((-1, "finite number >= 0"), (math.nan, "finite number >= 0"), (math.inf, "finite"),
                      ("12", "must return a number, got str"), (None, "got NoneType"), (True, "got bool")):
        with pytest.raises(CostError, match=why):
            _spec(lambda text, junk=junk: junk).of({"text": "a"})


def test_cost_options_are_checked_where_the_task_is_defined():
    app = Celery("cost-options", set_as_current=False)

    def model(text):
        return text

    cases: list[tuple[dict[str, Any], str]] = [
        (dict(max_batch_cost=10), "need.*cost="),
        (dict(cost=len, bucket=True, max_delay=0), "bucket=True regroups requests within max_delay"),
        (dict(cost=lambda text: 1, max_batch_cost=0), "max_batch_cost must be a positive number"),
        (dict(cost=lambda text: 1, max_batch_cost=math.inf), "max_batch_cost must be a positive number"),
        (dict(cost=lambda colour: 1), "takes 'colour', which is not a parameter of the task"),
        (dict(cost=lambda text: 1, padded="yes"), "padded must be True or False"),
        (dict(cost=3), "cost must be a function"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            batched(app, model, name=f"t.{len(message)}", **options)


def test_a_cost_tally_adds_up_as_its_form_says():
    summed, padded = _spec(max_batch_cost=10), _spec(max_batch_cost=10, padded=True)
    assert summed.total([1, 2, 3]) == 6 and padded.total([1, 2, 3]) == 9
    tally = padded.tally()
    for cost in (1, 2, 3):
        assert tally.fits(cost)
        tally.add(cost)
    assert not tally.fits(1)  # 3 x 4 = 12 > 10, though the item itself is small


# -- packing, pure ----------------------------------------------------------------------------------------------


def test_in_order_packing_stops_at_the_first_request_that_does_not_fit():
    spec = _spec(max_batch_cost=10)
    pick = in_order([4, 5, 2, 1], spec, batch_size=8)
    assert pick.chosen == [0, 1] and pick.full and pick.by_cost  # 2 would fit, but would jump the queue
    assert in_order([1, 1, 1], spec, batch_size=2).chosen == [0, 1]
    assert not in_order([1, 1], spec, batch_size=8).full


def test_bucketing_groups_similar_costs_and_serves_due_requests_first():
    spec = _spec(max_batch_cost=40, padded=True)
    costs = [2, 10, 2, 2, 10, 2, 10, 2]
    # Nothing due: the oldest (a short one) anchors a batch of short ones.
    pick = bucketed(costs, [0.0] * 8, now=0.1, spec=spec, batch_size=4, max_delay_s=0.5)
    assert pick.chosen == [0, 2, 3, 5] and pick.full
    # Both oldest are due: they go now, whatever their costs, with the others within the budget.
    seen = [0.0, 0.0, *[0.4] * 6]
    pick = bucketed(costs, seen, now=0.5, spec=spec, batch_size=4, max_delay_s=0.5)
    assert pick.chosen[:2] == [0, 1] and pick.full and spec.total([costs[i] for i in pick.chosen]) <= 40
    # A long one is the oldest: it anchors the other long ones, then the budget (10 x 4) allows one short one.
    pick = bucketed([10, 2, 2, 10, 2, 10, 2, 2], [0.0] * 8, now=0.1, spec=spec, batch_size=8, max_delay_s=0.5)
    assert pick.chosen == [0, 1, 3, 5] and pick.full and pick.by_cost


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40), st.integers(1, 16), st.booleans(),
       st.floats(0, 1))
def test_packing_never_passes_the_budget_and_always_serves_the_oldest(costs, batch_size, padded, now):
    spec = _spec(max_batch_cost=30, padded=padded)
    seen = sorted(random.Random(len(costs)).uniform(0, 1) for _ in costs)
    for pick in (in_order(costs, spec, batch_size), bucketed(costs, seen, now, spec, batch_size, 0.25)):
        chosen = [costs[i] for i in pick.chosen]
        assert 1 <= len(chosen) <= batch_size
        assert spec.total(chosen) <= 30
        assert pick.chosen[0] == 0  # the oldest request is never held back
        assert pick.chosen == sorted(set(pick.chosen))


# -- the client: computed at submit, carried in a header -------------------------------------------------------


@pytest.fixture
def costed(redis_url):
    from tests.apps import costed as module

    return module


def _queued(rclient, task) -> list[dict]:
    return [orjson.loads(raw) for raw in rclient.lrange(task.batching.queue, 0, -1)]


def test_the_cost_travels_in_a_header_from_every_way_of_sending(costed, rclient):
    task = costed.summed
    rclient.delete(task.batching.queue)
    task.delay("one two three")
    task.apply_async(kwargs={"text": "four words right here"})
    task.submit_many([{"text": "a b"}, ["c d e f g"]])
    asyncio.run(_submit_and_close(task, "x y z w v u"))
    costs = sorted(message["headers"][COST_HEADER] for message in _queued(rclient, task))
    assert costs == [2.0, 3.0, 4.0, 5.0, 6.0]
    rclient.delete(task.batching.queue)


async def _submit_and_close(task, text):
    try:
        await batching.aio.submit(task, text=text)
    finally:
        await batching.aio.close()


def test_an_oversize_request_fails_at_submit_and_nothing_is_sent(costed, rclient):
    task = costed.summed
    rclient.delete(task.batching.queue)
    long_text = " ".join(["w"] * 21)
    with pytest.raises(CostTooLarge, match="costs 21, more than max_batch_cost=20"):
        task.delay(long_text)
    with pytest.raises(CostTooLarge):
        task.submit_many([{"text": "fine"}, {"text": long_text}])  # all or nothing
    with pytest.raises(CostTooLarge):
        asyncio.run(_submit_and_close(task, long_text))
    with pytest.raises(CostError, match="raised RuntimeError: cannot measure this text"):
        costed.picky.delay("raise")
    assert rclient.llen(task.batching.queue) == 0 and rclient.llen(costed.picky.batching.queue) == 0


# -- a real worker -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cost_worker(redis_url, tmp_path_factory):
    from tests.conftest import Worker

    worker = Worker("tests.apps.costed", redis_url, tmp_path_factory.mktemp("costed") / "worker.log",
                    "--pool", "solo")
    worker.ready()
    yield worker
    worker.stop()


def _batches(rclient, name: str) -> list[list]:
    return [json.loads(b)["x"] for b in rclient.lrange("cost:batches:" + name, 0, -1)]


def _texts(n: int, seed: int, most: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{i}" for _ in range(rng.randint(1, most))) for i in range(n)]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "limit", "padded"), [("cost.summed", 20, False), ("cost.padded", 24, True)])
def test_batches_never_exceed_the_budget_and_keep_their_order(costed, cost_worker, rclient, name, limit, padded):
    task = costed.app.tasks[name]
    rclient.delete("cost:batches:" + name)
    texts = _texts(120, seed=12, most=12)
    results = task.submit_many([{"text": t} for t in texts])  # one pipeline: the consumer finds them all waiting
    assert [r.get(timeout=60) for r in results] == [len(t.split()) for t in texts]
    batches = _batches(rclient, name)
    spec = task.batching.cost
    for batch in batches:
        assert spec.total([len(t.split()) for t in batch]) <= limit, batch
    # Claim order, all of it, once each: what did not fit waited, still claimed, for the next batch.
    assert [t for batch in batches for t in batch] == texts
    # The budget, not batch_size (16), ended the batches: each one plus the next request would have passed it.
    assert max(len(b) for b in batches) < 16
    flat = iter(texts[sum(len(b) for b in batches[: i + 1]):] for i in range(len(batches) - 1))
    for batch, after in zip(batches, flat, strict=False):
        assert spec.total([len(t.split()) for t in [*batch, after[0]]]) > limit


@pytest.mark.integration
def test_sent_by_name_the_cost_is_computed_at_decode_and_bad_ones_fail_once(costed, cost_worker, rclient):
    app = costed.app
    rclient.delete("cost:batches:cost.picky")
    long_text = " ".join(["w"] * 51)
    sent = {
        "fine": app.send_task("cost.picky", kwargs={"text": "a b c"}),
        "scaled": app.send_task("cost.picky", args=["a b c d e f g h i j k"], kwargs={"scale": 3}),  # 33
        "oversize": app.send_task("cost.picky", kwargs={"text": long_text}),
        "raises": app.send_task("cost.picky", kwargs={"text": "raise"}),
        "nan": app.send_task("cost.picky", kwargs={"text": "nan"}),
        "missing": app.send_task("cost.picky", kwargs={"scale": 2}),
    }
    assert sent["fine"].get(timeout=30) == "A B C"
    assert sent["scaled"].get(timeout=30) == "A B C D E F G H I J K"
    expected = {
        "oversize": (CostTooLarge, "costs 51, more than max_batch_cost=50"),
        "raises": (CostError, "the cost function raised RuntimeError: cannot measure this text"),
        "nan": (CostError, "a cost must be a finite number >= 0, got nan"),
        "missing": (batching.MissingArgumentError, "missing required argument"),
    }
    for key, (kind, message) in expected.items():
        with pytest.raises(kind, match=message):
            sent[key].get(timeout=30)
        assert sent[key].state == states.FAILURE
    ran = [t for batch in _batches(rclient, "cost.picky") for t in batch]
    assert sorted(ran) == sorted(["a b c", "a b c d e f g h i j k"])  # the bad ones never reached the model
    # Never put back: nothing left to loop on.
    time.sleep(0.5)
    assert rclient.llen(costed.picky.batching.queue) == 0
    assert rclient.zcard(f"batching:claims:{costed.picky.batching.queue}") == 0


@pytest.mark.integration
def test_bucketing_groups_short_and_long_and_the_long_one_goes_out_on_time(costed, cost_worker, rclient):
    task = costed.bucketed
    name = "cost.bucketed"
    rclient.delete("cost:batches:" + name)
    max_delay = task.batching.policy.max_delay_s
    stop = threading.Event()
    shorts = []

    def stream() -> None:  # a steady stream of one-word requests, about 100/s: the batches are never empty
        i = 0
        while not stop.is_set() and i < 2000:
            shorts.append(task.delay(f"s{i}"))
            i += 1
            time.sleep(0.01)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        wait_until(lambda: len(_batches(rclient, name)) >= 5, 30, "the stream's first batches")
        sent_at = time.monotonic()
        long_one = task.delay(" ".join(["w"] * 10))
        assert long_one.get(timeout=30) == 10
        waited = time.monotonic() - sent_at
        time.sleep(0.3)
    finally:
        stop.set()
        sender.join()
    # On time: within max_delay plus one batch (with a margin for a loaded machine).
    assert waited <= max_delay + costed.BUCKET_BATCH_S + 0.4, waited
    assert [r.get(timeout=30) for r in shorts] == [1] * len(shorts)
    batches = poll_until(lambda: _batches(rclient, name), 5, "the batches")
    with_long = [b for b in batches if any(len(t.split()) == 10 for t in b)]
    assert len(with_long) == 1
    assert task.batching.cost.total([len(t.split()) for t in with_long[0]]) <= 32  # 10 x at most 3
    full_of_short = [b for b in batches if b is not with_long[0] and len(b) == 8]
    assert full_of_short, "the stream should fill batches of short requests"
    for batch in batches:
        assert task.batching.cost.total([len(t.split()) for t in batch]) <= 32


# -- the carry: claimed, never lost ----------------------------------------------------------------------------


@pytest.fixture
def store(rclient):
    from batching.store.keys import QueueKeys
    from batching.store.queue import QueueStore

    return QueueStore(rclient, QueueKeys(f"test-carry-{random.getrandbits(48):x}"), lease_s=30.0)


def _claimed(store, claim) -> list[bytes]:
    return store.client.lrange(store.keys.claim(claim.claim_id), 0, -1)


@pytest.mark.integration
def test_carry_moves_messages_into_a_second_claim_with_their_lists_and_a_lease(store):
    msgs = [f"m{i}".encode() for i in range(5)]
    for raw in msgs:
        store.client.lpush(store.keys.main, raw)
    batch = store.new_claim()
    assert store.claim(batch, 5) == 5
    carry = store.new_claim()
    assert store.carry(batch, carry, [msgs[2], msgs[4]]) == 2
    main = store.keys.main.encode()
    assert _claimed(store, batch) == [main, msgs[0], main, msgs[1], main, msgs[3]]
    assert _claimed(store, carry) == [main, msgs[2], main, msgs[4]]
    assert (batch.raws, carry.raws) == ([msgs[0], msgs[1], msgs[3]], [msgs[2], msgs[4]])
    assert store.client.zscore(store.keys.claims, carry.claim_id) > time.time() + 20
    # Given back (carry first, as the fetch thread does at shutdown), everything is queued again, once each.
    assert store.release([carry.claim_id, batch.claim_id]) == 5
    assert store.client.lrange(store.keys.main, 0, -1)[::-1] == [msgs[0], msgs[1], msgs[3], msgs[2], msgs[4]]
    assert store.client.zcard(store.keys.claims) == 0


@pytest.mark.integration
def test_carry_moves_nothing_out_of_a_claim_that_is_no_longer_ours(store):
    store.client.lpush(store.keys.main, b"a", b"b")
    batch = store.new_claim()
    store.claim(batch, 2)
    store.client.zadd(store.keys.claims, {batch.claim_id: time.time() - 1}, xx=True)
    assert store.recover() == (2, [])
    carry = store.new_claim()
    assert store.carry(batch, carry, [b"a"]) == 0
    assert not store.client.exists(store.keys.claim(carry.claim_id))
    assert store.client.zscore(store.keys.claims, carry.claim_id) is None
    assert sorted(store.client.lrange(store.keys.main, 0, -1)) == [b"a", b"b"]


@pytest.mark.integration
def test_a_warm_shutdown_gives_carried_requests_back_in_order(costed, start_worker, rclient):
    task = costed.slow
    for key in (costed.SLOW_STARTED, "cost:batches:cost.slow", task.batching.queue):
        rclient.delete(key)
    texts = [f"t{i}" for i in range(12)]
    results = task.submit_many([{"text": t} for t in texts])
    worker = start_worker("tests.apps.costed:slow_app", "--pool", "solo").ready()
    wait_until(lambda: rclient.exists(costed.SLOW_STARTED), 30, "the first batch to start", detail=worker.output)
    time.sleep(0.3)  # the next batch is formed and waits for the model, its overflow carried
    assert worker.stop() == 0
    assert _batches(rclient, "cost.slow") == [texts[:3]]  # the budget (3) ended it, not batch_size (4)
    assert [r.get(timeout=10) for r in results[:3]] == [1, 1, 1]
    assert {r.state for r in results[3:]} == {states.PENDING}
    left = [orjson.loads(raw) for raw in rclient.lrange(task.batching.queue, 0, -1)[::-1]]
    assert [m["headers"]["id"] for m in left] == [r.id for r in results[3:]]  # all back, oldest first
    assert rclient.zcard(f"batching:claims:{task.batching.queue}") == 0
    assert "gave 3 unstarted message(s) back" in worker.output() and "gave 1 unstarted" in worker.output()


@pytest.mark.integration
def test_in_durable_mode_a_carry_counts_only_once_the_replica_has_it(tmp_path):
    import signal

    from batching import NotReplicated
    from batching.store.keys import QueueKeys
    from batching.store.queue import QueueStore
    from batching.store.replication import Replicas
    from tests.replicas import replicated_redis

    with replicated_redis(tmp_path) as topo:
        store = QueueStore(topo.client("master"), QueueKeys("durable-carry"), lease_s=30.0,
                           replicas=Replicas(1, 0.5))
        store.client.lpush(store.keys.main, b"a", b"b", b"c")
        batch = store.new_claim()
        assert store.claim(batch, 3) == 3
        carry = store.new_claim()
        assert store.carry(batch, carry, [b"b"]) == 1
        assert topo.client("replica").lrange(store.keys.claim(carry.claim_id), 1, 1) == [b"b"]
        topo.signal("replica", signal.SIGSTOP)  # it stops acknowledging
        try:
            with pytest.raises(NotReplicated, match="a carried claim of 'durable-carry'"):
                store.carry(batch, store.new_claim(), [b"c"])
        finally:
            topo.signal("replica", signal.SIGCONT)
