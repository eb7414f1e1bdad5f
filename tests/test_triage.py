"""``triage``: claimed raw messages -> items to run, outcomes settled without running, or parked/dead-lettered.

Messages are real Celery messages, published to kombu's in-memory transport and taken back off its queue exactly
as the Redis transport stores them (the approach of ``test_codec``). The clock and the revoked set are passed in,
so nothing here waits or touches Redis.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import TaskRevokedError
from kombu.serialization import prepare_accept_content
from kombu.utils.json import dumps

from batching.errors import MessageError
from batching.store.queue import Claim, Finish
from batching.worker.batch import Batch, Outcome
from batching.worker.triage import Rules, triage

TASK = "shop.predict"
QUEUE = "batching.shop.predict"
NOW_DT = datetime(2030, 1, 1, 12, tzinfo=UTC)
NOW = NOW_DT.timestamp()
RULES = Rules(task_name=TASK, queue=QUEUE, accept=prepare_accept_content(["json"]), max_message_bytes=4096,
              hostname="w1@box")

_app = Celery("triage-test", broker="memory://", set_as_current=False)


def publish(task: str = TASK, **options: Any) -> tuple[bytes, str]:
    """(the bytes the Redis transport would store for ``task``, its task id)."""
    queue = f"triage-test-{uuid.uuid4()}"  # the memory transport's queues are shared by every connection
    with _app.connection_for_write() as connection:
        result = _app.send_task(task, queue=queue, connection=connection, **options)
        message = connection.default_channel._get(queue)
    return dumps(message).encode(), result.id


def sorted_into(raws: list[bytes], rules: Rules = RULES, revoked: frozenset[str] = frozenset(),
                now: float = NOW) -> Batch:
    batch = Batch(Claim("claim-1", list(raws)))
    triage(batch, raws, rules, revoked, now)
    return batch


def only_settled(batch: Batch) -> Outcome:
    assert batch.items == []
    assert batch.finish == Finish()
    (outcome,) = batch.settled
    return outcome


# -- runnable -----------------------------------------------------------------------------------------------------


def test_runnable_message_becomes_an_item_carrying_its_request() -> None:
    raw, task_id = publish(args=[1, "x"], kwargs={"scale": 2.0})

    batch = sorted_into([raw])

    (item,) = batch.items
    assert item.outcome is None
    request = item.request
    assert (request.id, request.task, request.args, request.kwargs) == (task_id, TASK, [1, "x"], {"scale": 2.0})
    assert request.hostname == "w1@box"
    # As a Celery worker fills it: the exchange the client published to, the queue it was taken from.
    assert request.delivery_info == {"exchange": "", "routing_key": QUEUE, "priority": 0, "redelivered": False}
    assert request.ignore_result is False
    assert request.root_id == task_id
    assert batch.settled == []
    assert batch.finish == Finish()


@pytest.mark.parametrize(("sent_ignoring", "task_ignores", "expected"),
                         [(False, False, False), (True, False, True), (False, True, True)])
def test_ignore_result_comes_from_the_message_or_the_task(sent_ignoring: bool, task_ignores: bool,
                                                          expected: bool) -> None:
    raw, _ = publish(args=[1], ignore_result=sent_ignoring)
    rules = Rules(TASK, QUEUE, RULES.accept, RULES.max_message_bytes, ignore_result=task_ignores)

    (item,) = sorted_into([raw], rules).items

    assert item.request.ignore_result is expected


def test_messages_keep_their_order_and_only_the_bad_one_is_taken_out() -> None:
    first, first_id = publish(args=[1])
    second, second_id = publish(args=[2])

    batch = sorted_into([first, b"garbage", second])

    assert [item.request.id for item in batch.items] == [first_id, second_id]
    assert [raw for _, raw in batch.finish.dead] == [b"garbage"]
    assert batch.settled == []


# -- settled without running --------------------------------------------------------------------------------------


def test_undecodable_message_with_a_readable_id_fails_as_that_task() -> None:
    raw, task_id = publish(args=[1])
    envelope = json.loads(raw)
    envelope["body"] = "%%% not base64 %%%"

    outcome = only_settled(sorted_into([json.dumps(envelope).encode()]))

    assert (outcome.task_id, outcome.state) == (task_id, states.FAILURE)
    assert type(outcome.value) is MessageError
    assert "body is not valid base64" in str(outcome.value)
    assert outcome.request is None


def dead_lettered_reason(raw: bytes) -> str:
    """Triage ``raw`` alone: it must be neither run nor failed but dead-lettered; returns the reason."""
    batch = sorted_into([raw])
    assert (batch.items, batch.settled) == ([], [])
    ((reason, dead_raw),) = batch.finish.dead
    assert dead_raw == raw
    return reason


def test_undecodable_message_without_a_readable_id_is_dead_lettered_with_a_reason() -> None:
    assert "undecodable message: JSONDecodeError" in dead_lettered_reason(b"{not even json")


def test_message_for_another_task_fails_naming_both_tasks() -> None:
    raw, task_id = publish("shop.other", args=[1])

    outcome = only_settled(sorted_into([raw]))

    assert (outcome.task_id, outcome.state) == (task_id, states.FAILURE)
    assert type(outcome.value) is MessageError
    assert "'shop.other'" in str(outcome.value)
    assert f"'{TASK}'" in str(outcome.value)
    assert outcome.request is not None
    assert outcome.request.task == "shop.other"


def test_revoked_task_is_revoked_and_the_rest_still_run() -> None:
    revoked_raw, revoked_id = publish(args=[1])
    other_raw, other_id = publish(args=[2])

    batch = sorted_into([revoked_raw, other_raw], revoked=frozenset({revoked_id}))

    (outcome,) = batch.settled
    assert (outcome.task_id, outcome.state) == (revoked_id, states.REVOKED)
    assert type(outcome.value) is TaskRevokedError
    assert str(outcome.value) == "revoked"
    assert [item.request.id for item in batch.items] == [other_id]


@pytest.mark.parametrize("expired_by", [timedelta(hours=1), timedelta(0)])
def test_expired_task_is_revoked_as_expired(expired_by: timedelta) -> None:
    raw, task_id = publish(args=[1], expires=NOW_DT - expired_by)

    outcome = only_settled(sorted_into([raw]))

    assert (outcome.task_id, outcome.state) == (task_id, states.REVOKED)
    assert type(outcome.value) is TaskRevokedError
    assert str(outcome.value) == "expired"


def test_task_that_expires_later_runs() -> None:
    raw, task_id = publish(args=[1], expires=NOW_DT + timedelta(seconds=1))

    assert [item.request.id for item in sorted_into([raw]).items] == [task_id]


def test_future_eta_is_parked_with_its_eta() -> None:
    eta = NOW_DT + timedelta(minutes=5)
    raw, _ = publish(args=[1], eta=eta)

    batch = sorted_into([raw])

    assert (batch.items, batch.settled, batch.finish.dead) == ([], [], [])
    assert batch.finish.delayed == [(eta.timestamp(), raw)]


@pytest.mark.parametrize("ago", [timedelta(minutes=5), timedelta(0)])
def test_due_eta_runs(ago: timedelta) -> None:
    raw, task_id = publish(args=[1], eta=NOW_DT - ago)

    batch = sorted_into([raw])

    assert [item.request.id for item in batch.items] == [task_id]
    assert batch.finish.delayed == []


# -- too large to read --------------------------------------------------------------------------------------------


def test_message_over_max_message_bytes_fails_unread_under_the_id_in_its_tail() -> None:
    raw, task_id = publish(args=["x" * 5000])
    assert len(raw) > RULES.max_message_bytes

    outcome = only_settled(sorted_into([raw]))

    assert (outcome.task_id, outcome.state) == (task_id, states.FAILURE)
    assert type(outcome.value) is MessageError
    assert "over this task's limit of 4,096 bytes (max_message_bytes)" in str(outcome.value)
    assert outcome.request is None  # never decoded


def test_message_at_the_limit_is_read() -> None:
    raw, task_id = publish(args=["x" * 100])
    rules = Rules(TASK, QUEUE, RULES.accept, max_message_bytes=len(raw))

    assert [item.request.id for item in sorted_into([raw], rules).items] == [task_id]


def test_oversized_message_without_a_correlation_id_is_dead_lettered() -> None:
    assert "max_message_bytes" in dead_lettered_reason(b'{"body": "' + b"A" * 5000 + b'"}')


def test_oversized_message_fails_under_its_own_id_whatever_its_headers_say() -> None:
    raw, task_id = publish(args=["x" * 5000], headers={"correlation_id": "someone-else"})

    outcome = only_settled(sorted_into([raw]))

    assert outcome.task_id == task_id


# -- the batch ----------------------------------------------------------------------------------------------------


def test_claimed_at_is_set_by_the_first_triage_only() -> None:
    first, _ = publish(args=[1])
    second, _ = publish(args=[2])
    batch = Batch(Claim("claim-1"))

    triage(batch, [first], RULES, frozenset(), NOW)
    triage(batch, [second], RULES, frozenset(), NOW + 5)

    assert batch.claimed_at == NOW
    assert len(batch.items) == 2


def test_outcomes_are_the_settled_ones_then_the_items_in_request_order() -> None:
    raws = [publish(args=[n])[0] for n in range(3)]
    other, other_id = publish("shop.other", args=[1])
    batch = sorted_into([raws[0], other, raws[1], raws[2]])
    for n, item in enumerate(batch.items):
        item.outcome = Outcome.of(item.request.id, n * 10, item.request)

    outcomes = batch.outcomes()

    assert [o.task_id for o in outcomes] == [other_id, *(item.request.id for item in batch.items)]
    assert [o.state for o in outcomes] == [states.FAILURE] + [states.SUCCESS] * 3
    assert [o.value for o in outcomes[1:]] == [0, 10, 20]


def test_outcomes_leave_out_items_that_have_not_run() -> None:
    raws = [publish(args=[n])[0] for n in range(2)]
    batch = sorted_into(raws)
    done = batch.items[1]
    done.outcome = Outcome.of(done.request.id, "ok", done.request)

    assert batch.outcomes() == [done.outcome]
