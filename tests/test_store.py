"""``QueueStore`` and its Lua scripts, on a real ``redis-server``: claim, wait, finish, release, recover, dead letters.

Lua runs only on real Redis here (fakeredis embeds another Lua). Leases never run out by waiting: a test that
needs a dead consumer moves the claim's deadline into the past, which is all a lease running out is.
After every step, ``located()`` finds each message in exactly one place: its queue lists, one claim, the delayed
set or the dead-letter list — a message is never in none of them, and never in two.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, states

from batching import DeadLetter, batched, list_dead, purge_dead, requeue_dead
from batching.store.keys import QueueKeys
from batching.store.queue import Claim, Finish, QueueStore
from batching.worker.consumer import BatchConsumer
from tests.conftest import bury

pytestmark = pytest.mark.integration

LEASE_S = 30.0
#: Bytes no text codec round-trips: invalid UTF-8, an encoded surrogate, NUL, quotes, backslashes, DEL, valid é.
NASTY = b'\xff\xfe\x00"\\/\x7f\xed\xa0\x80 caf\xc3\xa9 \x80\n{"body": 1}'


@pytest.fixture
def keys() -> QueueKeys:
    return QueueKeys(f"test-store-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(rclient: redis.Redis, keys: QueueKeys) -> QueueStore:
    return QueueStore(rclient, keys, lease_s=LEASE_S, max_deliveries=3)


def publish(store: QueueStore, *raws: bytes, step: int = 0) -> None:
    """Push as kombu's ``_put`` does: LPUSH, so the newest is at the left and the oldest at the right end."""
    key = store.keys.lists[step]
    for raw in raws:
        store.client.lpush(key, raw)


def queued(store: QueueStore, step: int = 0) -> list[bytes]:
    """A queue list in serving order: the next message to be claimed first."""
    items: list[bytes] = store.client.lrange(store.keys.lists[step], 0, -1)  # type: ignore[assignment]
    return items[::-1]


def recorded(store: QueueStore, claim: Claim) -> list[tuple[bytes, bytes]]:
    """(source list, raw) pairs recorded in a claim's list."""
    items: list[bytes] = store.client.lrange(store.keys.claim(claim.claim_id), 0, -1)  # type: ignore[assignment]
    return list(zip(items[::2], items[1::2], strict=True))


def expire(store: QueueStore, *claims: Claim) -> None:
    """The consumer holding these claims died: their lease deadlines pass."""
    store.client.zadd(store.keys.claims, {c.claim_id: time.time() - 1 for c in claims}, xx=True)


def dead_raws(store: QueueStore) -> list[bytes]:
    return [DeadLetter.parse(e).raw for e in store.dead_letters()]


def located(store: QueueStore) -> Counter[bytes]:
    """Every message the store holds, wherever it is (queue lists, claims, delayed set, dead letters)."""
    c: Any = store.client
    found: Counter[bytes] = Counter()
    for key in store.keys.lists:
        found.update(c.lrange(key, 0, -1))
    for key in c.scan_iter(match=store.keys.claim("*")):
        found.update(c.lrange(key, 0, -1)[1::2])
    found.update(c.zrange(store.keys.delayed, 0, -1))
    found.update(dead_raws(store))
    return found


def claim(store: QueueStore, count: int) -> Claim:
    into = store.new_claim()
    store.claim(into, count)
    return into


# -- claim -------------------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_messages_first_up_to_n(store: QueueStore) -> None:
    msgs = [f"m{i}".encode() for i in range(5)]
    publish(store, *msgs)
    first = store.new_claim()
    assert store.claim(first, 3) == 3
    assert first.raws == msgs[:3]
    assert first.redelivered == 0
    assert queued(store) == msgs[3:]
    assert located(store) == Counter(msgs)

    second = claim(store, 10)
    assert second.raws == msgs[3:]
    assert queued(store) == []
    assert located(store) == Counter(msgs)


def test_claim_records_each_message_with_its_source_and_the_lease_deadline(store: QueueStore) -> None:
    publish(store, b"a", b"b")
    before = time.time()
    c = claim(store, 5)
    after = time.time()
    main = store.keys.main.encode()
    assert recorded(store, c) == [(main, b"a"), (main, b"b")]
    deadline = store.client.zscore(store.keys.claims, c.claim_id)
    assert deadline is not None
    assert before + LEASE_S <= deadline <= after + LEASE_S


def test_claim_serves_priority_lists_highest_first_and_records_each_source(store: QueueStore) -> None:
    lists = store.keys.lists
    assert [k.encode() for k in lists] == [
        store.keys.queue.encode(), *(f"{store.keys.queue}\x06\x16{s}".encode() for s in (3, 6, 9))
    ]
    publish(store, b"p9", step=3)
    publish(store, b"p6-old", b"p6-new", step=2)
    publish(store, b"p0", step=0)
    publish(store, b"p3", step=1)

    c = claim(store, 4)
    assert c.raws == [b"p0", b"p3", b"p6-old", b"p6-new"]
    assert recorded(store, c) == [
        (lists[0].encode(), b"p0"), (lists[1].encode(), b"p3"),
        (lists[2].encode(), b"p6-old"), (lists[2].encode(), b"p6-new"),
    ]
    assert queued(store, 3) == [b"p9"]


def test_claim_of_an_empty_queue_records_nothing(store: QueueStore) -> None:
    c = store.new_claim()
    assert store.claim(c, 10) == 0
    assert c.raws == []
    assert store.client.zcard(store.keys.claims) == 0
    assert not store.client.exists(store.keys.claim(c.claim_id))


def test_top_up_adds_to_the_same_claim_and_renews_its_deadline(store: QueueStore) -> None:
    publish(store, b"a")
    c = claim(store, 5)
    store.client.zadd(store.keys.claims, {c.claim_id: time.time() + 1})
    publish(store, b"b", b"c")
    assert store.claim(c, 5) == 2
    assert c.raws == [b"a", b"b", b"c"]
    assert [raw for _src, raw in recorded(store, c)] == [b"a", b"b", b"c"]
    assert (store.client.zscore(store.keys.claims, c.claim_id) or 0) > time.time() + LEASE_S - 5
    assert store.client.zcard(store.keys.claims) == 1


# -- finish ------------------------------------------------------------------------------------------------------


def test_finish_by_the_owner_drops_the_claim_parks_dead_letters_and_counts_the_batch(store: QueueStore) -> None:
    publish(store, b"run-1", b"run-2", b"later", NASTY)
    c = claim(store, 10)
    eta = time.time() + 3600
    outcome = Finish(ran=2, delayed=[(eta, b"later")], dead=[("cannot read its task id", NASTY)])
    assert store.finish(c, outcome) is True

    assert store.client.zcard(store.keys.claims) == 0
    assert not store.client.exists(store.keys.claim(c.claim_id))
    assert store.client.zrange(store.keys.delayed, 0, -1, withscores=True) == [(b"later", pytest.approx(eta))]
    (letter,) = [DeadLetter.parse(e) for e in store.dead_letters()]
    assert (letter.queue, letter.reason, letter.raw) == (store.keys.queue, "cannot read its task id", NASTY)
    assert store.batch_sizes() == {2: 1}
    assert store.client.hget(store.keys.stats, "requests") == b"2"
    assert located(store) == Counter([b"later", NASTY])  # the two that ran are done

    store.finish(claim(store, 1), Finish())  # nothing claimed, nothing ran: not a batch
    assert store.batch_sizes() == {2: 1}


def test_finish_after_the_claim_was_recovered_returns_false_and_writes_nothing(store: QueueStore) -> None:
    publish(store, b"a", b"b")
    c = claim(store, 10)
    expire(store, c)
    other = QueueStore(store.client, store.keys, lease_s=LEASE_S)
    assert other.recover() == (2, [])

    late = Finish(ran=2, delayed=[(time.time() + 60, b"a")], dead=[("bad", b"b")])
    assert store.finish(c, late) is False
    assert store.client.zcard(store.keys.delayed) == 0
    assert store.dead_letters() == []
    assert store.batch_sizes() == {}
    assert not store.client.exists(store.keys.stats)
    assert queued(store) == [b"a", b"b"]
    assert located(store) == Counter([b"a", b"b"])


# -- release -----------------------------------------------------------------------------------------------------


def test_release_puts_messages_back_at_the_front_in_original_order(store: QueueStore) -> None:
    msgs = [f"m{i}".encode() for i in range(5)]
    publish(store, *msgs)
    c = claim(store, 3)
    publish(store, b"newer")
    assert store.release([c.claim_id]) == 3
    assert store.client.zcard(store.keys.claims) == 0
    assert not store.client.exists(store.keys.claim(c.claim_id))
    assert located(store) == Counter([*msgs, b"newer"])

    again = claim(store, 4)
    assert again.raws == msgs[:4]
    assert again.redelivered == 0  # a release is not a failed delivery
    assert store.release([again.claim_id, c.claim_id, "never-existed"]) == 4


def test_release_returns_each_message_to_the_list_it_came_from(store: QueueStore) -> None:
    publish(store, b"p0", step=0)
    publish(store, b"p6", step=2)
    c = claim(store, 5)
    assert store.release([c.claim_id]) == 2
    assert queued(store, 0) == [b"p0"]
    assert queued(store, 2) == [b"p6"]


# -- recover -----------------------------------------------------------------------------------------------------


def test_recover_takes_only_claims_whose_lease_ran_out(store: QueueStore) -> None:
    publish(store, b"dead-1", b"dead-2", b"live")
    dead = claim(store, 2)
    live = claim(store, 1)
    expire(store, dead)

    assert store.recover() == (2, [])
    assert store.client.zscore(store.keys.claims, dead.claim_id) is None
    assert store.client.zscore(store.keys.claims, live.claim_id) is not None
    assert recorded(store, live) == [(store.keys.main.encode(), b"live")]
    assert queued(store) == [b"dead-1", b"dead-2"]
    assert store.recover() == (0, [])
    assert located(store) == Counter([b"dead-1", b"dead-2", b"live"])


def test_recover_never_takes_a_claim_whose_lease_was_renewed(store: QueueStore) -> None:
    publish(store, b"a")
    c = claim(store, 1)
    expire(store, c)
    store.heartbeat("consumer-1", [c.claim_id])
    assert store.recover() == (0, [])
    # recover() reads the expired ids, then the script checks each deadline again: a heartbeat in between wins.
    assert store._requeue_claims("expired", [c.claim_id]) == (0, [])
    assert recorded(store, c) == [(store.keys.main.encode(), b"a")]
    assert store.client.hlen(store.keys.deliveries) == 0


def test_recover_marks_a_dead_batch_for_halves_and_requeues_ahead_of_newer_messages(store: QueueStore) -> None:
    publish(store, b"a", b"b")
    c = claim(store, 2)
    publish(store, b"newer")
    expire(store, c)
    assert store.recover() == (2, [])
    assert queued(store) == [b"a", b"b", b"newer"]
    # a batch that died counts no delivery against its messages: they come back in groups of half its size
    marks = store.client.hgetall(store.keys.deliveries)
    assert marks == {b"w:" + hashlib.sha1(raw).hexdigest().encode(): b"1" for raw in (b"a", b"b")}


def test_a_dead_batch_comes_back_in_halves_that_run_as_batches(store: QueueStore) -> None:
    msgs = [f"m{i}".encode() for i in range(8)]
    publish(store, *msgs)
    expire(store, claim(store, 8))
    assert store.recover() == (8, [])
    publish(store, b"newer")
    first, second = claim(store, 10), claim(store, 10)
    assert (first.raws, first.redelivered) == (msgs[:4], 1)
    assert (second.raws, second.redelivered) == (msgs[4:], 1)
    assert store.claim(first, 10) == 0  # a suspect group is never topped up
    for c in (first, second):
        assert store.finish(c, Finish(ran=4))
    assert store.client.hlen(store.keys.deliveries) == 0  # finished: no longer suspect
    assert claim(store, 10).raws == [b"newer"]


def test_a_killer_is_cornered_in_log2_n_plus_max_deliveries_deaths_and_innocents_never_die_for_it(
    store: QueueStore,
) -> None:
    msgs = [f"m{i}".encode() for i in range(8)]
    killer = msgs[5]
    publish(store, *msgs)
    deaths, finished = 0, []
    while queued(store):
        c = claim(store, 10)
        if killer in c.raws:  # its consumer dies; the lease runs out
            deaths += 1
            expire(store, c)
            store.recover()
        else:
            assert store.finish(c, Finish(ran=len(c.raws)))
            finished += c.raws
    assert deaths == 3 + 3  # halving 8 -> 4 -> 2 -> 1, then max_deliveries deaths alone
    assert sorted(finished) == sorted(m for m in msgs if m != killer)
    assert dead_raws(store) == [killer]


def test_redelivered_message_first_in_line_is_claimed_alone(store: QueueStore) -> None:
    publish(store, b"suspect", b"innocent")
    crashed = claim(store, 1)
    expire(store, crashed)
    store.recover()
    publish(store, b"fresh")

    c = store.new_claim()
    assert store.claim(c, 10) == 1
    assert (c.raws, c.redelivered) == ([b"suspect"], 1)
    assert store.claim(c, 10) == 0  # a claim holding a suspect takes nothing more
    assert queued(store) == [b"innocent", b"fresh"]
    assert claim(store, 10).raws == [b"innocent", b"fresh"]


def test_claim_stops_before_a_redelivered_message_that_is_behind_others(store: QueueStore) -> None:
    publish(store, b"suspect", b"fresh-1")
    crashed = claim(store, 1)
    holder = claim(store, 1)  # a live consumer holds fresh-1 and will give it back unstarted
    expire(store, crashed)
    store.recover()
    assert store.release([holder.claim_id]) == 1
    assert queued(store) == [b"fresh-1", b"suspect"]

    c = claim(store, 10)
    assert (c.raws, c.redelivered) == ([b"fresh-1"], 0)
    assert queued(store) == [b"suspect"]  # still first in line
    alone = claim(store, 10)
    assert (alone.raws, alone.redelivered) == ([b"suspect"], 1)


def test_claim_stops_before_a_redelivered_message_on_a_lower_priority_list(store: QueueStore) -> None:
    publish(store, b"suspect", b"behind", step=1)
    crashed = claim(store, 1)
    expire(store, crashed)
    store.recover()
    publish(store, b"p0", step=0)

    c = claim(store, 10)
    assert (c.raws, c.redelivered) == ([b"p0"], 0)
    assert queued(store, 1) == [b"suspect", b"behind"]


def test_top_up_never_adds_a_redelivered_message_to_a_claim_in_hand(store: QueueStore) -> None:
    # The consumer tops up its forming batch while the model runs; a suspect re-queued meanwhile must wait for a
    # claim of its own rather than join (and, if it kills the consumer, take down) the batch in hand.
    publish(store, b"suspect", b"first")
    crashed = claim(store, 1)
    in_hand = claim(store, 1)
    assert in_hand.raws == [b"first"]
    expire(store, crashed)
    store.recover()

    assert store.claim(in_hand, 10) == 0
    assert (in_hand.raws, in_hand.redelivered) == ([b"first"], 0)
    assert [raw for _src, raw in recorded(store, in_hand)] == [b"first"]
    assert queued(store) == [b"suspect"]
    assert located(store) == Counter([b"suspect", b"first"])


def test_message_is_dead_lettered_on_its_max_deliveries_th_expired_delivery(store: QueueStore) -> None:
    publish(store, NASTY, b"neighbour")
    c = claim(store, 10)
    assert c.raws == [NASTY, b"neighbour"]
    expire(store, c)
    assert store.recover() == (2, [])  # its batch died: halves, no delivery counted yet
    for redelivered in (1, 1):  # the half that holds it is itself alone: each death now counts
        c = claim(store, 10)
        assert (c.raws, c.redelivered) == ([NASTY], redelivered)
        expire(store, c)
        assert store.recover() == (1, [])
        assert queued(store)[0] == NASTY
    c = claim(store, 10)
    assert (c.raws, c.redelivered) == ([NASTY], 2)
    expire(store, c)

    assert store.recover() == (0, [NASTY])
    assert queued(store) == [b"neighbour"]
    assert store.client.zcard(store.keys.claims) == 0
    (entry,) = store.dead_letters()
    data = json.loads(entry.decode("utf-8", "surrogateescape"))
    assert data["queue"] == store.keys.queue
    assert data["deliveries"] == 3
    assert "delivered 3 time(s) and never finished" in data["reason"]
    letter = DeadLetter.parse(entry)
    assert letter.raw == NASTY
    assert (letter.deliveries, letter.entry) == (3, entry)
    assert not store.client.hexists(store.keys.deliveries, hashlib.sha1(NASTY).hexdigest())
    assert located(store) == Counter([NASTY, b"neighbour"])


def test_max_deliveries_of_one_dead_letters_on_the_first_expiry(store: QueueStore) -> None:
    once = QueueStore(store.client, store.keys, lease_s=LEASE_S, max_deliveries=1)
    publish(once, b"a", b"b")
    expire(once, claim(once, 10))
    assert once.recover() == (2, [])  # a batch's death dead-letters nobody: it comes back in halves
    for raw in (b"a", b"b"):
        c = claim(once, 10)
        assert c.raws == [raw]
        expire(once, c)
        assert once.recover() == (0, [raw])
    assert sorted(dead_raws(once)) == [b"a", b"b"]


def test_finishing_a_redelivered_message_forgets_its_delivery_count(store: QueueStore) -> None:
    publish(store, b"a")
    c = claim(store, 1)
    expire(store, c)
    store.recover()
    again = claim(store, 1)
    assert again.redelivered == 1
    assert store.finish(again, Finish(ran=1)) is True
    assert store.client.hlen(store.keys.deliveries) == 0
    publish(store, b"a")  # the same bytes sent again are a new message
    assert claim(store, 1).redelivered == 0


def test_recover_handles_claims_in_pages(store: QueueStore) -> None:
    publish(store, *(f"m{i}".encode() for i in range(5)))
    claims = [claim(store, 1) for _ in range(5)]
    expire(store, *claims)
    assert store.recover(limit=2) == (2, [])
    assert store.client.zcard(store.keys.claims) == 3
    assert store.recover(limit=10) == (3, [])
    assert sorted(queued(store)) == [f"m{i}".encode() for i in range(5)]


# -- delayed (ETA) messages --------------------------------------------------------------------------------------


def test_due_delayed_messages_return_to_the_front_and_next_eta_reports_the_earliest(store: QueueStore) -> None:
    publish(store, b"soon", b"due-first", b"due-second", b"far")
    c = claim(store, 10)
    now = time.time()
    parked = [(now + 3600, b"far"), (now - 5, b"due-first"), (now + 60, b"soon"), (now - 1, b"due-second")]
    assert store.finish(c, Finish(delayed=parked))
    assert store.client.zcard(store.keys.delayed) == 4
    publish(store, b"fresh")

    nxt = claim(store, 10)
    assert nxt.raws == [b"due-first", b"due-second", b"fresh"]  # the longest due first, ahead of newer messages
    assert nxt.next_eta == pytest.approx(now + 60)
    assert store.client.zrange(store.keys.delayed, 0, -1) == [b"soon", b"far"]
    assert located(store) == Counter([b"soon", b"far", b"due-first", b"due-second", b"fresh"])

    empty = claim(store, 10)  # an empty claim still says when to wake up
    assert (empty.raws, empty.next_eta) == ([], pytest.approx(now + 60))


def test_next_eta_is_none_without_delayed_messages(store: QueueStore) -> None:
    publish(store, b"a")
    assert claim(store, 10).next_eta is None


# -- wait --------------------------------------------------------------------------------------------------------


def blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


def test_wait_returns_promptly_when_a_message_arrives_and_removes_nothing(
    store: QueueStore, redis_url: str
) -> None:
    waiter = QueueStore(redis.Redis.from_url(redis_url), store.keys)
    before = blocked_clients(store.client)
    woke = threading.Event()

    def wait() -> None:
        waiter.wait(30.0)
        woke.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while blocked_clients(store.client) <= before and time.monotonic() < deadline:
        time.sleep(0.005)  # polls Redis until the waiter is blocked in it: synchronisation, not a guess
    assert not woke.is_set()
    sent = time.monotonic()
    publish(store, b"a")
    assert woke.wait(5.0), "wait() did not wake up for a new message"
    assert time.monotonic() - sent < 2.0  # its timeout was 30 s
    assert queued(store) == [b"a"]
    waiter.client.close()


def test_wait_on_a_non_empty_queue_returns_at_once_and_keeps_order(store: QueueStore) -> None:
    msgs = [b"m0", b"m1", b"m2"]
    publish(store, *msgs)
    started = time.monotonic()
    for _ in range(3):
        store.wait(30.0)
    assert time.monotonic() - started < 5
    assert queued(store) == msgs


def test_wait_times_out_on_an_empty_queue(store: QueueStore) -> None:
    started = time.monotonic()
    store.wait(0.05)
    store.wait(0)  # 0 must not mean "forever"
    assert time.monotonic() - started < 5
    assert queued(store) == []


# -- heartbeat ---------------------------------------------------------------------------------------------------


def test_heartbeat_extends_only_claims_that_still_exist(store: QueueStore) -> None:
    publish(store, b"live", b"lost")
    live, lost = claim(store, 1), claim(store, 1)
    store.client.zadd(store.keys.claims, {live.claim_id: time.time() + 1})
    expire(store, lost)
    store.recover()

    store.heartbeat("consumer-1", [live.claim_id, lost.claim_id, "never-existed"])
    assert (store.client.zscore(store.keys.claims, live.claim_id) or 0) > time.time() + LEASE_S - 5
    assert store.client.zscore(store.keys.claims, lost.claim_id) is None
    assert store.client.zscore(store.keys.claims, "never-existed") is None
    assert store.client.zscore(store.keys.consumers, "consumer-1") == pytest.approx(time.time(), abs=5)
    store.leave("consumer-1")
    assert store.client.zscore(store.keys.consumers, "consumer-1") is None


# -- dead letters through the store ------------------------------------------------------------------------------


def test_dead_letter_entries_keep_any_bytes(store: QueueStore) -> None:
    bury(store, "bad", NASTY)
    (entry,) = store.dead_letters()
    assert json.loads(entry.decode("utf-8", "surrogateescape"))["reason"] == "bad"
    assert DeadLetter.parse(entry).raw == NASTY


@pytest.mark.parametrize("entry", [b"not json", b"[1, 2]", b'{"raw": 5}', b"{}", b'{"raw": "\\ud800"}', b"\xff"])
def test_an_entry_that_is_not_a_dead_letter_is_listed_whole(entry: bytes) -> None:
    letter = DeadLetter.parse(entry)
    assert (letter.reason, letter.raw, letter.entry, letter.task_id) == (
        "unreadable dead-letter entry", entry, entry, None
    )


def test_dead_letter_with_odd_fields_still_parses() -> None:
    letter = DeadLetter.parse(b'{"raw": "x", "at": "soon", "deliveries": "3", "reason": 7}')
    assert (letter.raw, letter.at, letter.deliveries, letter.reason, letter.queue) == (b"x", 0.0, None, "7", "?")


def test_requeue_dead_moves_each_entry_back_once_as_a_new_message(store: QueueStore) -> None:
    publish(store, b"a", b"b")
    c = claim(store, 10)
    store.finish(c, Finish(dead=[("r1", b"a"), ("r2", b"b")]))
    publish(store, b"queued")
    letters = [DeadLetter.parse(e) for e in store.dead_letters()]
    assert [(d.reason, d.raw) for d in letters] == [("r2", b"b"), ("r1", b"a")]  # newest first

    pairs = [(d.entry, d.raw) for d in letters]
    assert store.requeue_dead(pairs) == 2
    assert store.requeue_dead(pairs) == 0  # already moved: never duplicated
    assert store.dead_letters() == []
    assert queued(store) == [b"queued", b"b", b"a"]  # at the newest end, as new messages
    assert located(store) == Counter([b"a", b"b", b"queued"])


def test_requeue_dead_resets_the_delivery_count(store: QueueStore) -> None:
    once = QueueStore(store.client, store.keys, lease_s=LEASE_S, max_deliveries=2)
    publish(once, b"a")
    for _ in range(2):
        c = claim(once, 1)
        expire(once, c)
        once.recover()
    (letter,) = [DeadLetter.parse(e) for e in once.dead_letters()]
    assert once.requeue_dead([(letter.entry, letter.raw)]) == 1
    assert claim(once, 1).redelivered == 0


def test_purge_dead_counts_and_empties_the_list(store: QueueStore) -> None:
    publish(store, b"a", b"b")
    store.finish(claim(store, 10), Finish(dead=[("r", b"a"), ("r", b"b")]))
    assert store.purge_dead() == 2
    assert store.dead_letters() == []
    assert store.purge_dead() == 0


# -- with a real Celery app ---------------------------------------------------------------------------------------


def double(x: list[int]) -> list[int]:
    return [v * 2 for v in x]


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("store-test", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(result_expires=600)
    yield app
    app.close()


def batched_double(app: Celery, **options: Any) -> Any:
    name = f"store_test.double_{uuid.uuid4().hex[:8]}"
    return batched(app, double, name=name, **options)


def test_deadletters_helpers_list_requeue_and_purge(app: Celery) -> None:
    task = batched_double(app, max_deliveries=1, lease_s=LEASE_S)
    result = task.delay(x=21)
    store, connection = QueueStore.open(task.app, task.batching)
    try:
        c = claim(store, 10)
        expire(store, c)
        assert store.recover() == (0, c.raws)
        bury(store, "garbage", NASTY)

        garbage, crashed = list_dead(task)
        assert (garbage.reason, garbage.raw, garbage.task_id) == ("garbage", NASTY, None)
        assert crashed.task_id == result.id
        assert crashed.deliveries == 1
        assert "delivered 1 time(s)" in crashed.reason
        assert len(list_dead(task, limit=1)) == 1
        assert list_dead(task, limit=0) == []

        assert requeue_dead(task, [crashed]) == 1
        assert requeue_dead(task, [crashed]) == 0
        assert [d.raw for d in list_dead(task)] == [NASTY]
        assert BatchConsumer.for_task(task).drain() == 1
        assert result.get(timeout=10) == 42
        assert result.state == states.SUCCESS

        assert purge_dead(task) == 1
        assert list_dead(task) == []
        assert requeue_dead(task) == 0
    finally:
        connection.release()


def test_requeue_dead_without_a_selection_moves_them_all(app: Celery) -> None:
    task = batched_double(app)
    store, connection = QueueStore.open(task.app, task.batching)
    try:
        publish(store, b"a", b"b")
        store.finish(claim(store, 10), Finish(dead=[("r", b"a"), ("r", b"b")]))
        assert requeue_dead(task) == 2
        assert sorted(queued(store)) == [b"a", b"b"]
        assert list_dead(task) == []
    finally:
        connection.release()


def test_global_keyprefix_keys_are_prefixed_and_delay_lands_where_the_store_claims(
    app: Celery, rclient: redis.Redis
) -> None:
    prefix = f"pfx-{uuid.uuid4().hex[:6]}:"
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    task = batched_double(app)
    store, connection = QueueStore.open(task.app, task.batching)
    try:
        queue = task.batching.queue
        assert store.keys.prefix == prefix
        assert store.keys.main == f"{prefix}{queue}"
        assert store.keys.claims == f"{prefix}batching:claims:{queue}"
        assert all(k.startswith(prefix) for k in store.keys.lists)

        plain = task.delay(x=1)
        urgent = task.apply_async(kwargs={"x": 2}, priority=5)
        assert rclient.llen(f"{prefix}{queue}") == 1
        assert rclient.llen(queue) == 0

        c = claim(store, 10)
        ids = [json.loads(raw)["headers"]["id"] for raw in c.raws]
        assert ids == [plain.id, urgent.id]  # priority 0 is served first on Redis
        assert store.finish(c, Finish(ran=2))
        written = {k.decode(errors="replace") for k in rclient.scan_iter(match=f"*{queue}*")}
        assert written and all(k.startswith(prefix) for k in written), written
    finally:
        connection.release()
