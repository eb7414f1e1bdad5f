"""``coalesce=True`` against real Redis and real workers: identical requests in flight at once run once, and every
caller gets the result or the error under its own task id — within a batch, across batches and across workers, when
the owner's worker is SIGKILLed mid-batch, and when one caller is revoked."""

from __future__ import annotations

import asyncio
import importlib
import signal
import time
from collections import Counter
from types import ModuleType

import pytest
import redis
from celery import states

import batching.aio
from batching import gather
from batching.store.keys import QueueKeys
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ONE_REQUEST_A_MINUTE = {"COALESCE_RATE": "1/m"}


@pytest.fixture(scope="module")
def coal(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.coalescing")


@pytest.fixture(autouse=True)
def clean(coal: ModuleType, rclient: redis.Redis) -> None:
    rclient.delete(coal.SEEN, coal.HOLD, coal.HELD, QueueKeys(coal.shout.batching.queue).abandoned)


def seen(coal: ModuleType, rclient: redis.Redis) -> Counter:
    """How often the model saw each input."""
    return Counter(v.decode() for v in rclient.lrange(coal.SEEN, 0, -1))  # type: ignore[union-attr]


def hold_one(coal: ModuleType, rclient: redis.Redis, worker, text: str = "hold"):
    """Send one request the model will hold, and wait until a batch is running it."""
    rclient.set(coal.HOLD, 1)
    owner = coal.shout.delay(text)
    wait_until(lambda: rclient.llen(coal.HELD) >= 1, 30, "the owner's batch to start", detail=worker.output)
    return owner


def test_identical_requests_in_one_batch_run_once_and_share_values_and_errors(coal, start_worker, rclient):
    worker = start_worker("tests.apps.coalescing", "--pool", "solo").ready()
    calls = [{"text": "a"}] * 6 + [{"text": "b"}] * 3 + [{"text": "a", "times": 1}, ("a",), {"text": "a", "times": 2}]
    calls += [{"text": "boom"}] * 3
    results = coal.shout.submit_many(calls)  # queued together: one batch of 15
    values = gather(results[:12], timeout=30)
    assert values == ["A"] * 6 + ["B"] * 3 + ["A", "A", "AA"]
    for failed in results[12:]:
        with pytest.raises(coal.Refused, match="boom is refused"):
            failed.get(timeout=10)
        assert failed.state == states.FAILURE
    assert len({r.id for r in results}) == len(results)  # each caller's own task id, own result
    # The model saw each distinct input once: "a" (explicit default included), "a" twice over, "b", "boom".
    assert sorted(rclient.lrange(coal.SEEN, 0, -1)) == [b"a", b"a", b"b", b"boom"], worker.output()


def test_followers_on_another_worker_get_the_owners_result_and_the_model_sees_the_input_once(
    coal, start_worker, rclient,
):
    owner_worker = start_worker("tests.apps.coalescing", "--pool", "solo", env=ONE_REQUEST_A_MINUTE).ready()
    owner = hold_one(coal, rclient, owner_worker)
    other = start_worker("tests.apps.coalescing", "--pool", "solo").ready()  # claims all that follows
    followers = [coal.shout.delay("hold") for _ in range(5)]
    bystander = coal.shout.delay("c")
    assert bystander.get(timeout=30) == "C"  # the other worker is serving: it has claimed the followers too
    wait_until(lambda: rclient.llen(coal.shout.batching.queue) == 0, 10, "the queue to empty", detail=other.output)
    assert all(f.state == states.PENDING for f in followers), "followers answered before the owner's batch ended"
    rclient.delete(coal.HOLD)
    assert owner.get(timeout=30) == "HOLD"
    assert [f.get(timeout=30) for f in followers] == ["HOLD"] * 5
    assert seen(coal, rclient) == Counter({"hold": 1, "c": 1}), other.output()


def test_errors_are_shared_across_batches_too(coal, start_worker, rclient):
    worker = start_worker("tests.apps.coalescing", "--pool", "solo").ready()
    owner = hold_one(coal, rclient, worker, "hold")
    first = coal.shout.delay("boom")
    wait_until(lambda: rclient.llen(coal.shout.batching.queue) == 0, 10, "the claim of the first boom")
    # The first "boom" waits in the next batch, formed while the held one runs; its twins join it from the queue.
    twins = [coal.shout.delay("boom") for _ in range(3)]
    wait_until(lambda: rclient.llen(coal.shout.batching.queue) == 0, 10, "the claim of the twins")
    rclient.delete(coal.HOLD)
    assert owner.get(timeout=30) == "HOLD"
    for result in [first, *twins]:
        with pytest.raises(coal.Refused, match="boom is refused"):
            result.get(timeout=30)
        assert result.state == states.FAILURE
    assert seen(coal, rclient) == Counter({"hold": 1, "boom": 1}), worker.output()


def test_an_owner_sigkilled_mid_batch_still_lets_every_caller_finish(coal, start_worker, rclient):
    doomed = start_worker("tests.apps.coalescing", "--pool", "solo", env=ONE_REQUEST_A_MINUTE).ready()
    owner = hold_one(coal, rclient, doomed)
    survivor = start_worker("tests.apps.coalescing", "--pool", "solo").ready()
    followers = [coal.shout.delay("hold") for _ in range(5)]
    wait_until(lambda: rclient.llen(coal.shout.batching.queue) == 0, 10, "the followers to be claimed",
               detail=survivor.output)
    time.sleep(0.5)  # the survivor has moved them into the owner's claim: they are held under its lease
    assert all(f.state == states.PENDING for f in followers)
    doomed.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    rclient.delete(coal.HOLD)
    values = gather([owner, *followers], timeout=60)
    assert values == ["HOLD"] * 6, survivor.output()
    print(f"\ncoalescing owner SIGKILLed: its 6 callers answered {time.monotonic() - killed_at:.1f}s after the kill")
    assert seen(coal, rclient)["hold"] >= 2  # once in the killed batch, then again after recovery


def test_revoking_one_caller_leaves_the_others_results(coal, start_worker, rclient):
    worker = start_worker("tests.apps.coalescing", "--pool", "solo").ready()
    owner = hold_one(coal, rclient, worker)
    followers = [coal.shout.delay("hold") for _ in range(3)]
    wait_until(lambda: rclient.llen(coal.shout.batching.queue) == 0, 10, "the followers to be claimed")
    time.sleep(0.3)
    # The owner's own caller gives up on its running task, and one follower is revoked.
    coal.app.control.revoke(owner.id, terminate=True, reply=True, destination=[worker.nodename], timeout=10)
    coal.app.control.revoke(followers[0].id, reply=True, destination=[worker.nodename], timeout=10)
    wait_until(lambda: owner.state == states.REVOKED, 10, "the owner to be REVOKED", detail=worker.output)
    rclient.delete(coal.HOLD)
    assert [f.get(timeout=30) for f in followers[1:]] == ["HOLD", "HOLD"]
    wait_until(lambda: followers[0].state == states.REVOKED, 10, "the revoked follower to be REVOKED")
    assert owner.state == states.REVOKED
    assert seen(coal, rclient)["hold"] == 1, worker.output()


def test_callers_that_give_up_waiting_cancel_no_one(coal, start_worker, rclient):
    """``batching.aio`` abandonment: the owner's caller and one follower's time out; the computation still serves
    everyone, the ones that gave up included (they were claimed, so they run as usual)."""
    worker = start_worker("tests.apps.coalescing", "--pool", "solo").ready()
    rclient.set(coal.HOLD, 1)

    async def scenario() -> tuple[list[bool], list[str]]:
        owner = await batching.aio.submit(coal.shout, "hold")
        await asyncio.to_thread(wait_until, lambda: rclient.llen(coal.HELD) >= 1, 30, "the owner's batch to start")
        followers = [await batching.aio.submit(coal.shout, "hold") for _ in range(3)]
        await asyncio.to_thread(wait_until, lambda: rclient.llen(coal.shout.batching.queue) == 0, 10,
                                "the followers to be claimed")
        gave_up = []
        for quitter in (owner, followers[0]):
            try:
                await batching.aio.wait(quitter, timeout=0.2)  # times out: marked abandoned
                gave_up.append(False)
            except TimeoutError:
                gave_up.append(True)
        rclient.delete(coal.HOLD)
        try:
            return gave_up, await batching.aio.gather([owner, *followers], timeout=30)
        finally:
            await batching.aio.close()

    gave_up, values = asyncio.run(scenario())
    assert gave_up == [True, True]
    assert rclient.zcard(QueueKeys(coal.shout.batching.queue).abandoned) == 2  # both were marked abandoned
    assert values == ["HOLD"] * 4, worker.output()
    assert seen(coal, rclient)["hold"] == 1
