"""What "identical" means for ``coalesce=True`` (pure), and the Redis scripts that hand a follower to its owner's
claim and back (on a real ``redis-server``: Lua runs only there)."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.worker import state as worker_state
from hypothesis import given
from hypothesis import strategies as st

from batching import ConfigurationError, batched
from batching.coalesce import distinct, request_key
from batching.merge import CallSpec
from batching.store.coalesce import CoalesceStore
from batching.store.keys import QueueKeys
from batching.store.queue import Claim, Finish, QueueStore
from batching.worker.consumer import BatchConsumer
from tests.test_store import expire, located, publish, queued, recorded


def predict(text: Any, scale: Any = 1.0, tags: Any = None) -> Any:
    return text


SPEC = CallSpec.from_callable(predict)


def key(*args: Any, **kwargs: Any) -> str | None:
    return request_key("shop.predict", SPEC, args, kwargs)


# -- what "identical" means ----------------------------------------------------------------------------------------


def test_positional_keyword_and_explicit_default_are_the_same_request() -> None:
    assert key("hi") == key(text="hi") == key("hi", 1.0) == key("hi", scale=1.0, tags=None)
    assert key("hi", tags={"a": 1, "b": [1, 2]}) == key("hi", tags={"b": [1, 2], "a": 1})  # dict order is not
    assert key("hi", tags=(1, 2)) == key("hi", tags=[1, 2])  # what a JSON message carries for both


def test_values_json_keeps_apart_are_different_requests() -> None:
    assert key("hi") != key("ho")
    assert key("hi", 1) != key("hi", 1.0)  # int and float
    assert key("hi", True) != key("hi", 1)
    assert key("hi", math.nan) != key("hi", None) != key("hi", math.inf)
    assert key("hi", tags=[1, 2]) != key("hi", tags=[2, 1])
    assert request_key("shop.other", SPEC, ("hi",), {}) != key("hi")  # another task


def test_requests_that_cannot_be_keyed_run_on_their_own() -> None:
    assert key() is None  # missing the required argument: merge fails it on its own
    assert key("hi", unknown=1) is None
    assert key(b"bytes") is None  # no JSON form (a pickle or msgpack body)
    assert key("hi", tags={1: "int key", "1": "str key"}) is None


@given(st.lists(st.one_of(st.none(), st.sampled_from("abcde")), max_size=40))
def test_distinct_runs_each_key_once_and_maps_every_request_to_its_result(keys: list[str | None]) -> None:
    run, source = distinct(keys)
    ran = [keys[i] for i in run]
    assert len([k for k in ran if k is not None]) == len({k for k in keys if k is not None})
    assert ran.count(None) == keys.count(None)
    assert run == sorted(run)
    for i, k in enumerate(keys):
        assert keys[run[source[i]]] == k
        if k is None:
            assert run[source[i]] == i  # a keyless request gets its own result


def test_coalesce_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="coalesce must be True or False"):
        batched(Celery("c"), coalesce="yes")(predict)  # type: ignore[arg-type]


# -- the scripts, on real Redis ------------------------------------------------------------------------------------


@pytest.fixture
def store(rclient: redis.Redis) -> QueueStore:
    return QueueStore(rclient, QueueKeys(f"test-coalesce-{uuid.uuid4().hex[:12]}"), lease_s=30.0)


def take(store: QueueStore, n: int) -> Claim:
    claim = store.new_claim()
    store.claim(claim, n)
    return claim


@pytest.mark.integration
def test_a_request_in_flight_elsewhere_moves_into_that_claim_and_an_empty_claim_is_dropped(store: QueueStore) -> None:
    co = CoalesceStore(store)
    publish(store, b"m-owner", b"m-twin", b"m-other")
    owner = take(store, 1)
    assert co.join(owner, [("k1", b"m-owner")]) == [True]
    second = take(store, 1)
    assert co.join(second, [("k1", b"m-twin")]) == [False]
    main = store.keys.main.encode()
    assert recorded(store, owner) == [(main, b"m-owner"), (main, b"m-twin")]
    assert store.client.zscore(store.keys.claims, second.claim_id) is None  # nothing left in it
    third = take(store, 1)
    assert co.join(third, [("k2", b"m-other")]) == [True]
    assert located(store) == Counter([b"m-owner", b"m-twin", b"m-other"])  # each in exactly one place


@pytest.mark.integration
def test_an_owner_whose_lease_ran_out_is_not_joined_and_its_claim_recovers_its_followers(store: QueueStore) -> None:
    co = CoalesceStore(store)
    publish(store, b"a1", b"a2", b"a3")
    owner = take(store, 1)
    co.join(owner, [("k", b"a1")])
    follower = take(store, 1)
    assert co.join(follower, [("k", b"a2")]) == [False]
    expire(store, owner)  # the owner's consumer died
    late = take(store, 1)
    assert co.join(late, [("k", b"a3")]) == [True]  # a dead owner is never waited for: this one computes it
    assert store.client.get(store.keys.coalesce("k")) == late.claim_id.encode()
    requeued, dead = store.recover()
    assert (requeued, dead) == (2, [])  # the owner's message and its follower, back in the queue
    assert set(queued(store)) == {b"a1", b"a2"}
    assert located(store) == Counter([b"a1", b"a2", b"a3"])


@pytest.mark.integration
def test_close_returns_the_followers_stops_new_ones_and_only_for_the_claims_owner(store: QueueStore) -> None:
    co = CoalesceStore(store)
    publish(store, b"o", b"f1", b"f2", b"f3")
    owner = take(store, 1)
    co.join(owner, [("k", b"o")])
    for raw in (b"f1", b"f2"):
        assert co.join(take(store, 1), [("k", raw)]) == [False]
    assert sorted(co.close(owner, ["k"])) == [b"f1", b"f2", b"o"]
    assert store.client.exists(store.keys.coalesce("k")) == 0
    latecomer = take(store, 1)
    assert co.join(latecomer, [("k", b"f3")]) == [True]  # after the close, an identical request computes anew
    assert sorted(co.close(owner, ["k"])) == [b"f1", b"f2", b"o"]  # a second close (a retried call) is harmless
    assert store.client.get(store.keys.coalesce("k")) == latecomer.claim_id.encode()  # not the old owner's to drop
    assert store.finish(owner, Finish(ran=1))
    assert located(store) == Counter([b"f3"])  # answered followers leave with the owner's claim
    stranger = Claim(uuid.uuid4().hex)
    assert co.close(stranger, ["k"]) == []  # a claim that is not (or no longer) ours: nothing written
    assert store.client.get(store.keys.coalesce("k")) == latecomer.claim_id.encode()


@pytest.mark.integration
def test_the_key_expires_two_leases_after_its_last_use(store: QueueStore) -> None:
    co = CoalesceStore(store)
    publish(store, b"x")
    owner = take(store, 1)
    co.join(owner, [("k", b"x")])
    ttl_ms = store.client.pttl(store.keys.coalesce("k"))
    assert 2 * 30_000 - 5_000 < ttl_ms <= 2 * 30_000
    store.client.pexpire(store.keys.coalesce("k"), 10_000)
    publish(store, b"y")
    assert CoalesceStore(store).join(take(store, 1), [("k", b"y")]) == [False]
    assert store.client.pttl(store.keys.coalesce("k")) > 50_000  # a follower joining renews it


# -- two in-process consumers on real Redis: the paths a worker test cannot time ----------------------------------


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("coalesce-test", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(result_expires=600)
    yield app
    app.close()


@pytest.fixture
def consumers() -> Iterator[list[BatchConsumer]]:
    """In-process consumers (no threads: the test drives them), their connections released at the end."""
    made: list[BatchConsumer] = []
    yield made
    for consumer in made:
        consumer.stop(timeout=5)
        if consumer.keeper is not None and consumer.keeper.writer.client is not None:
            consumer.keeper.writer.client.close()


def recorded_upper(calls: list[list[str]]) -> Any:
    def upper(text: list[str]) -> list[str]:
        calls.append(list(text))
        return [t.upper() for t in text]

    return upper


def two_consumers(app: Celery, consumers: list[BatchConsumer], calls: list[list[str]]) -> tuple[Any, ...]:
    """A coalescing task that records its model's inputs in ``calls``, and two consumers of it."""
    task = batched(app, recorded_upper(calls), name=f"coal_test.up_{uuid.uuid4().hex[:8]}", coalesce=True)
    owner_side, other_side = BatchConsumer.for_task(task), BatchConsumer.for_task(task)
    consumers += [owner_side, other_side]
    return task, owner_side, other_side


@pytest.mark.integration
def test_a_follower_claimed_by_another_consumer_is_answered_by_the_owners(
    app: Celery, consumers: list[BatchConsumer],
) -> None:
    calls: list[list[str]] = []
    task, owner_side, other_side = two_consumers(app, consumers, calls)
    first = task.delay("x")
    batch = owner_side.collect(idle_timeout_s=0.0)
    assert batch is not None and len(batch.items) == 1
    twin, stranger = task.delay("x"), task.delay("y")
    assert other_side.drain() == 1  # claims both: the twin moves into the owner's claim, only "y" runs here
    assert stranger.get(timeout=10) == "Y"
    assert twin.state == states.PENDING
    owner_side.run(batch)
    owner_side._settle(owner_side._done.get(timeout=10))
    assert (first.get(timeout=10), twin.get(timeout=10)) == ("X", "X")
    assert sorted(calls) == [["x"], ["y"]]  # "x" ran once, for both callers


@pytest.mark.integration
def test_followers_of_an_owner_revoked_before_its_batch_started_go_back_and_run(
    app: Celery, consumers: list[BatchConsumer],
) -> None:
    calls: list[list[str]] = []
    task, owner_side, other_side = two_consumers(app, consumers, calls)
    revoked = task.delay("x")
    batch = owner_side.collect(idle_timeout_s=0.0)
    assert batch is not None
    twins = [task.delay("x") for _ in range(3)]
    assert other_side.drain() == 0  # all three moved into the owner's claim: nothing left to run here
    assert task.app.backend.client.llen(task.batching.queue) == 0
    worker_state.revoked.add(revoked.id)  # the owner's caller revokes it before its batch starts
    try:
        owner_side.run(batch)  # control.start settles it REVOKED and runs nothing
        owner_side._settle(owner_side._done.get(timeout=10))
    finally:
        worker_state.revoked.discard(revoked.id)
    assert revoked.state == states.REVOKED
    assert calls == []
    assert other_side.drain() == 3  # given back to the queue; one computes, the others merge with it
    assert [t.get(timeout=10) for t in twins] == ["X", "X", "X"]
    assert calls == [["x"]]
