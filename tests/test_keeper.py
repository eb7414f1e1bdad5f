"""``Keeper``: a batch's follow-ups, results, events and the finish of its claim, in Celery's order — and the
housekeeping between batches. Store, result writer, events and canvas are fakes that write to one journal, so
every test can assert the global order of calls; ``maintain``'s heartbeat (a Lua script) runs on the real Redis,
an outage on a disconnected fakeredis.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, cast

import fakeredis
import pytest
import redis
from celery import Celery, states
from kombu.serialization import prepare_accept_content

from batching.codec import Request
from batching.errors import MessageError
from batching.merge import CallSpec
from batching.policy import FlushPolicy
from batching.settings import BatchSettings, RetryPolicy
from batching.store import outage
from batching.store.keys import QueueKeys
from batching.store.outage import Outage, Stopped
from batching.store.queue import Claim, Finish, QueueStore
from batching.store.replication import NO_WAIT
from batching.worker import canvas
from batching.worker.batch import Batch, Item, Outcome
from batching.worker.keeper import Keeper, never_finished
from batching.worker.request import TaskRequest

TASK = "shop.double"
ACCEPT = prepare_accept_content(["json"])
#: What a batch with nothing to retry goes through, in order.
ORDER = ["plan_retries", "send_callbacks", "write", "after_store", "send_retries", "events", "finish"]


class Flaky(Exception):
    """The error the task retries on."""


def double(x: list[int]) -> list[int]:
    return [v * 2 for v in x]


SETTINGS = BatchSettings(name=TASK, queue=f"batching.{TASK}", spec=CallSpec.from_callable(double),
                         policy=FlushPolicy(8, 0.0))


@dataclass
class Journal:
    """Every call the keeper makes, in order, and what each was given."""

    calls: list[str] = field(default_factory=list)
    written: list[list[tuple[str, str]]] = field(default_factory=list)
    retries_sent: list[list[tuple[str, float]]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    finished: list[tuple[Claim, Finish]] = field(default_factory=list)


class Fake:
    """Notes each call in the journal, and raises the queued ``failures`` first, one per call."""

    def __init__(self, journal: Journal, *failures: BaseException) -> None:
        self.journal, self.failures = journal, list(failures)

    def called(self, name: str) -> None:
        self.journal.calls.append(name)
        if self.failures:
            raise self.failures.pop(0)


class FakeStore(Fake):
    max_deliveries = 3
    client = None
    replicas = NO_WAIT  # no durable mode
    keys = QueueKeys(f"batching.{TASK}")
    owned = True  # False: the claim's lease ran out and it was re-queued while the results were being written
    still_ours = True  # False: the claim was taken over before the keeper got to this batch

    def owns(self, claim: Claim) -> bool:
        return self.still_ours

    def outlived_data(self, claim: Claim) -> bool:
        return False  # taken over by another consumer, not lost with Redis's data

    def finish(self, claim: Claim, finish: Finish) -> bool:
        self.called("finish")
        self.journal.finished.append((claim, finish))
        return self.owned


class FakeWriter(Fake):
    accepts = True  # False: the write's fence found the claim gone and wrote nothing

    def write(self, outcomes: list[Outcome], fence: tuple[str, str] | None = None) -> bool:
        self.called("write")
        if self.accepts:
            self.journal.written.append([(o.task_id, o.state) for o in outcomes])
        return self.accepts


class FakeEvents(Fake):
    def send_batch(self, outcomes: list[Outcome], **times: Any) -> None:
        self.called("events")
        self.journal.events.append({"states": [o.state for o in outcomes], **times})


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    """Records the canvas steps; retries are planned for real, never sent."""
    journal = Journal()
    plan_retries = canvas.plan_retries

    def plan(policy: RetryPolicy | None, outcomes: list[Outcome]) -> list[tuple[Outcome, float]]:
        journal.calls.append("plan_retries")
        return plan_retries(policy, outcomes)

    def send_retries(app: Any, name: str, planned: list[tuple[Outcome, float]]) -> None:
        journal.calls.append("send_retries")
        journal.retries_sent.append([(o.task_id, countdown) for o, countdown in planned])

    monkeypatch.setattr(canvas, "plan_retries", plan)
    monkeypatch.setattr(canvas, "send_callbacks", lambda app, outcomes: journal.calls.append("send_callbacks"))
    monkeypatch.setattr(canvas, "after_store", lambda app, outcomes: journal.calls.append("after_store"))
    monkeypatch.setattr(canvas, "send_retries", send_retries)
    monkeypatch.setattr(outage, "RETRY_MIN_S", 0.001)  # an outage's backoff, not a wait the test is about
    return journal


def make_keeper(journal: Journal, *, store: Any = None, writer: Any = None, retry: RetryPolicy | None = None,
                stop: threading.Event | None = None) -> Keeper:
    keeper = Keeper(
        Celery("keeper-test", set_as_current=False), replace(SETTINGS, retry=retry),
        cast(Any, store if store is not None else FakeStore(journal)), Outage(TASK),
        events=cast(Any, FakeEvents(journal)), accept=ACCEPT, stop=stop or threading.Event(),
    )
    keeper.writer = cast(Any, writer if writer is not None else FakeWriter(journal))
    return keeper


def batch_of(*results: Any, retries: int = 0) -> Batch:
    """A batch that ran: one item per result (an exception is that item's FAILURE), one message each."""
    batch = Batch(Claim("claim-1", [b"raw"] * len(results)), claimed_at=1000.0, started_at=1001.0)
    for n, result in enumerate(results):
        request = TaskRequest(Request(id=f"t{n}", task=TASK, args=[n], kwargs={}, headers={"retries": retries},
                                      properties={}), "w1@box", SETTINGS.queue, False)
        batch.items.append(Item(request, Outcome.of(request.id, result, request)))
    return batch


def envelope(task_id: str | None, body: str | None = None) -> bytes:
    """A kombu envelope by hand: base64 body ``[[1], {}, {}]`` unless given, the task id in its headers."""
    body = base64.b64encode(b"[[1], {}, {}]").decode() if body is None else body
    headers = {"task": TASK, **({"id": task_id} if task_id else {})}
    return json.dumps({"body": body, "content-type": "application/json", "content-encoding": "utf-8",
                       "headers": headers, "properties": {"body_encoding": "base64"}}).encode()


# -- settle: the order -------------------------------------------------------------------------------------------


def test_follow_ups_then_results_then_the_rest_and_finishing_the_claim_last(journal, caplog) -> None:
    batch = batch_of(2, 4, 6)
    batch.settled.append(Outcome.failure("bad", MessageError("unreadable")))
    batch.finish.delayed.append((2000.0, b"later"))
    batch.finish.dead.append(("not a kombu message envelope", b"junk"))

    make_keeper(journal).settle(batch)

    assert journal.calls == ORDER
    assert journal.written == [[("bad", states.FAILURE)] + [(f"t{n}", states.SUCCESS) for n in range(3)]]
    ((claim, finish),) = journal.finished
    assert claim is batch.claim
    assert finish.ran == 3
    assert finish.delayed == [(2000.0, b"later")]
    assert finish.dead == [("not a kombu message envelope", b"junk")]
    assert "dead-lettered a message: not a kombu message envelope" in caplog.text
    assert (journal.events[0]["received"], journal.events[0]["started"]) == (1000.0, 1001.0)


def test_a_batch_that_only_settled_messages_finishes_with_nothing_ran(journal) -> None:
    batch = Batch(Claim("claim-1", [b"raw"]), claimed_at=1000.0)
    batch.settled.append(Outcome.failure("bad", MessageError("unreadable")))

    make_keeper(journal).settle(batch)

    assert journal.calls == ORDER
    assert journal.finished[0][1].ran == 0


def test_redis_outages_while_writing_and_finishing_are_ridden_out_and_the_order_holds(journal, caplog) -> None:
    writer = FakeWriter(journal, redis.ConnectionError("down"), redis.TimeoutError("slow"))
    store = FakeStore(journal, ConnectionResetError("reset"))

    make_keeper(journal, store=store, writer=writer).settle(batch_of(2, 4))

    assert journal.calls == ["plan_retries", "send_callbacks", "write", "write", "write", *ORDER[3:], "finish"]
    assert journal.written == [[("t0", states.SUCCESS), ("t1", states.SUCCESS)]]
    assert len(journal.finished) == 1
    assert caplog.text.count("Redis unreachable") == 2  # once per outage
    assert caplog.text.count("Redis is back") == 2


def test_stopping_during_an_outage_raises_stopped_and_leaves_the_claim_to_its_lease(journal) -> None:
    stop = threading.Event()
    stop.set()
    writer = FakeWriter(journal, redis.ConnectionError("down"))

    with pytest.raises(Stopped):
        make_keeper(journal, writer=writer, stop=stop).settle(batch_of(2, 4))

    assert journal.calls == ["plan_retries", "send_callbacks", "write"]
    assert journal.finished == []


def test_stopping_without_an_outage_still_settles(journal) -> None:
    stop = threading.Event()
    stop.set()

    make_keeper(journal, stop=stop).settle(batch_of(2))

    assert journal.calls == ORDER


def test_an_unexpected_writer_error_propagates_and_the_claim_is_not_finished(journal) -> None:
    writer = FakeWriter(journal, ValueError("bug"))

    with pytest.raises(ValueError, match="bug"):
        make_keeper(journal, writer=writer).settle(batch_of(2))

    assert journal.finished == []


def test_a_claim_lost_to_its_lease_is_logged_not_raised(journal, caplog) -> None:
    store = FakeStore(journal)
    store.owned = False

    make_keeper(journal, store=store).settle(batch_of(2))

    assert journal.calls == ORDER
    assert "outlived its lease and was taken over while its results were stored" in caplog.text


def test_a_claim_taken_over_before_settling_drops_every_follow_up_and_result(journal, caplog) -> None:
    store = FakeStore(journal)
    store.still_ours = False

    make_keeper(journal, store=store).settle(batch_of(2, Flaky("x")))

    assert journal.calls == [] and journal.written == [] and journal.finished == []
    assert "dropped the 2 outcome(s) of this late run" in caplog.text


def test_a_claim_lost_with_redis_s_data_still_gets_its_results_stored(journal, caplog, monkeypatch) -> None:
    store = FakeStore(journal)
    store.still_ours = False
    monkeypatch.setattr(store, "outlived_data", lambda claim: True)

    make_keeper(journal, store=store).settle(batch_of(2, 3))

    assert journal.written == [[("t0", states.SUCCESS), ("t1", states.SUCCESS)]]
    assert journal.finished == []  # nothing left in Redis to finish
    assert "Redis lost its data while a batch of 2 ran; storing its results anyway" in caplog.text


def test_a_write_fenced_off_stops_before_anything_that_follows_the_results(journal, caplog) -> None:
    writer = FakeWriter(journal)
    writer.accepts = False

    make_keeper(journal, writer=writer).settle(batch_of(2))

    assert journal.calls == ORDER[: ORDER.index("write") + 1]
    assert journal.written == [] and journal.finished == []
    assert "dropped the 1 outcome(s) of this late run" in caplog.text


# -- settle: the claim checked by the results script itself (results on the broker's Redis) -----------------------


class CheckedStore(FakeStore):
    """Notes each ownership check in the journal."""

    lost_data = False

    def owns(self, claim: Claim) -> bool:
        self.journal.calls.append("owns")
        return self.still_ours

    def outlived_data(self, claim: Claim) -> bool:
        return self.lost_data


class FencedWriter(FakeWriter):
    """Writes nothing under a fence once the claim is gone, as results.lua does."""

    def __init__(self, journal: Journal, store: CheckedStore) -> None:
        super().__init__(journal)
        self.store = store

    def write(self, outcomes: list[Outcome], fence: tuple[str, str] | None = None) -> bool:
        self.accepts = fence is None or self.store.still_ours
        return super().write(outcomes, fence)


def fenced_keeper(journal: Journal, *, still_ours: bool = True, lost_data: bool = False) -> Keeper:
    store = CheckedStore(journal)
    store.still_ours, store.lost_data = still_ours, lost_data
    keeper = make_keeper(journal, store=store, writer=FencedWriter(journal, store))
    keeper.fence_in_write = True
    return keeper


def with_callback(batch: Batch) -> Batch:
    item = batch.items[0]
    request = TaskRequest(Request(id=item.request.id, task=TASK, args=[0], kwargs={}, headers={}, properties={},
                                  embed={"callbacks": [{"task": "shop.notify"}]}), "w1@box", SETTINGS.queue, False)
    batch.items[0] = Item(request, Outcome.of(request.id, 0, request))
    return batch


def test_without_callbacks_the_results_script_alone_checks_the_claim(journal) -> None:
    fenced_keeper(journal).settle(batch_of(2, 3))

    assert journal.calls == ORDER  # no separate ownership round trip
    assert journal.written == [[("t0", states.SUCCESS), ("t1", states.SUCCESS)]]


def test_a_callback_to_send_is_still_preceded_by_the_ownership_check(journal) -> None:
    fenced_keeper(journal).settle(with_callback(batch_of(2, 3)))
    assert journal.calls == ["owns", *ORDER]

    journal.calls.clear()
    fenced_keeper(journal, still_ours=False).settle(with_callback(batch_of(2, 3)))
    assert journal.calls == ["owns"]  # taken over: the callback is never sent


def test_taken_over_without_a_first_check_the_fenced_write_drops_everything(journal, caplog) -> None:
    fenced_keeper(journal, still_ours=False).settle(batch_of(2, 3))

    assert journal.calls == ORDER[: ORDER.index("write") + 1]
    assert journal.written == [] and journal.finished == []
    assert "dropped the 2 outcome(s) of this late run" in caplog.text


def test_lost_with_redis_s_data_without_a_first_check_the_results_are_stored_anyway(journal, caplog) -> None:
    fenced_keeper(journal, still_ours=False, lost_data=True).settle(batch_of(2, 3))

    assert journal.written == [[("t0", states.SUCCESS), ("t1", states.SUCCESS)]]
    assert journal.finished == []  # nothing left in Redis to finish
    assert journal.calls.count("write") == 2 and "events" in journal.calls
    assert "Redis lost its data while a batch of 2 ran; storing its results anyway" in caplog.text


# -- settle: retries ---------------------------------------------------------------------------------------------


def test_retryable_failures_are_stored_as_retry_and_resent_after_the_results(journal) -> None:
    policy = RetryPolicy(on=(Flaky,), max_retries=3, delay_s=7.0)
    batch = batch_of(Flaky("again"), ValueError("no"), 6)

    make_keeper(journal, retry=policy).settle(batch)

    assert journal.calls == ORDER
    assert journal.written == [[("t0", states.RETRY), ("t1", states.FAILURE), ("t2", states.SUCCESS)]]
    assert journal.retries_sent == [[("t0", 7.0)]]
    assert journal.events[0]["states"] == [states.RETRY, states.FAILURE, states.SUCCESS]


@pytest.mark.parametrize(("policy", "retries", "state"), [
    (RetryPolicy(on=(Flaky,), max_retries=2), 1, states.RETRY),
    (RetryPolicy(on=(Flaky,), max_retries=2), 2, states.FAILURE),  # exhausted
    (RetryPolicy(on=(Flaky,), max_retries=0), 0, states.FAILURE),
    (RetryPolicy(on=(Flaky,), max_retries=None), 100, states.RETRY),  # forever
    (RetryPolicy(on=(Exception,), dont=(Flaky,)), 0, states.FAILURE),
    (None, 0, states.FAILURE),
])
def test_a_retryable_failure_is_retried_until_its_retries_run_out(journal, policy: RetryPolicy | None,
                                                                  retries: int, state: str) -> None:
    make_keeper(journal, retry=policy).settle(batch_of(Flaky("again"), retries=retries))

    assert journal.written == [[("t0", state)]]
    assert [len(sent) for sent in journal.retries_sent] == [1 if state == states.RETRY else 0]


# -- messages that never finished --------------------------------------------------------------------------------


def test_never_finished_fails_only_the_messages_whose_id_can_be_read() -> None:
    raws = [envelope("a"), b"{not json", envelope(None), envelope("b", body="%%% not base64")]

    outcomes = never_finished(raws, ACCEPT, max_deliveries=3)

    assert [(o.task_id, o.state) for o in outcomes] == [("a", states.FAILURE), ("b", states.FAILURE)]
    assert all(type(o.value) is MessageError for o in outcomes)
    assert "dead-lettered after 3 deliveries that never finished" in str(outcomes[0].value)


# -- maintain ----------------------------------------------------------------------------------------------------


@pytest.fixture
def real_store(rclient: redis.Redis) -> QueueStore:
    return QueueStore(rclient, QueueKeys(f"batching.{TASK}.{uuid.uuid4().hex}"), lease_s=30.0)


@pytest.mark.integration
def test_maintain_extends_only_live_claims_and_records_the_heartbeat(journal, real_store: QueueStore) -> None:
    fake_store = real_store
    client, keys = fake_store.client, fake_store.keys
    client.zadd(keys.claims, {"live": time.time() + 1})
    before = time.time()

    make_keeper(journal, store=fake_store).maintain("consumer-1", ["live", "recovered"])

    assert client.zrange(keys.claims, 0, -1) == [b"live"]
    deadline = client.zscore(keys.claims, "live")
    assert deadline is not None
    assert before + 30 <= deadline <= time.time() + 30
    beat = client.zscore(keys.consumers, "consumer-1")
    assert beat is not None
    assert before <= beat <= time.time()
    assert journal.calls == []


def test_maintain_fails_the_dead_letters_it_recovered(journal, monkeypatch, caplog) -> None:
    fake_store = QueueStore(fakeredis.FakeRedis(), QueueKeys(f"batching.{TASK}"), lease_s=30.0)
    monkeypatch.setattr(fake_store, "heartbeat", lambda consumer_id, claim_ids, tuning: None)
    monkeypatch.setattr(fake_store, "recover", lambda: (2, [envelope("a"), b"{not json"]))

    make_keeper(journal, store=fake_store).maintain("consumer-1", [])

    assert journal.written == [[("a", states.FAILURE)]]
    assert "re-queued 2 message(s) from expired claims, dead-lettered 2" in caplog.text


def test_maintain_during_an_outage_logs_it_and_returns(journal, caplog) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    store = QueueStore(fakeredis.FakeRedis(server=server), QueueKeys(f"batching.{TASK}"))

    make_keeper(journal, store=store).maintain("consumer-1", ["live"])

    assert "Redis unreachable" in caplog.text
    assert journal.calls == []
