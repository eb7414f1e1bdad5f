"""Nothing lost: crashes, Redis connection loss, warm shutdown, poison inputs and Celery's task semantics."""

from __future__ import annotations

import functools
import importlib
import signal
import subprocess
import threading
import time
from collections import Counter
from types import ModuleType
from typing import cast

import pytest
import redis
from celery import states
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.result import ResultSet

from batching import gather
from batching.errors import MessageError
from batching.store.keys import QueueKeys
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

LEASE_S = 2.0  # tests/apps/reliable.py


@pytest.fixture(scope="module")
def rel(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.reliable")


@pytest.fixture(autouse=True)
def clean(rclient: redis.Redis) -> None:
    rclient.delete("reliable:ran", "reliable:poison_calls", "reliable:quiet")


def all_succeeded(client: redis.Redis, ids: list[str]) -> bool:
    """Every task's stored meta says SUCCESS (one MGET per thousand ids)."""
    for start in range(0, len(ids), 1000):
        metas = client.mget([f"celery-task-meta-{i}" for i in ids[start:start + 1000]])
        if not all(m is not None and b'"status": "SUCCESS"' in m for m in metas):
            return False
    return True


def ran(rclient: redis.Redis) -> Counter:
    return Counter(int(v) for v in rclient.lrange("reliable:ran", 0, -1))


def claimed_task_ids(rclient: redis.Redis, task) -> set[str]:
    """Task ids of every message currently held in a claim of the task's queue."""
    from batching.codec import Request, decode

    keys = QueueKeys(task.batching.queue)
    ids = set()
    for claim_id in cast(list[bytes], rclient.zrange(keys.claims, 0, -1)):  # the client does not decode responses
        items = cast(list[bytes], rclient.lrange(keys.claim(claim_id.decode()), 0, -1))
        for raw in items[1::2]:
            request = decode(raw, {"application/json"})
            assert isinstance(request, Request), request
            ids.add(request.id)
    return ids


def test_sigkill_mid_run_loses_nothing_and_recovers_within_the_lease(rel, start_worker, rclient):
    n = 3000
    results = [rel.work.delay(x=i) for i in range(n)]
    first = start_worker("tests.apps.reliable", "--pool", "solo")
    wait_until(lambda: rclient.llen("reliable:ran") >= 300, 60, "the first worker to make progress")
    first.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    in_claims = claimed_task_ids(rclient, rel.work)
    assert in_claims, "the killed worker held no claim: nothing to recover, the test proves nothing"

    start_worker("tests.apps.reliable", "--pool", "solo").ready()
    by_id = {r.id: r for r in results}
    recovery_s = wait_until(
        lambda: all(by_id[i].state == states.SUCCESS for i in in_claims), 30, "the dead worker's claims to finish"
    )
    assert ResultSet(results).get(timeout=120) == [i * 10 for i in range(n)]
    assert recovery_s <= LEASE_S * 1.25 + 10, f"recovered after {recovery_s:.1f}s"
    print(f"\nSIGKILL recovery: {len(in_claims)} claimed tasks done {time.monotonic() - killed_at:.1f}s after the kill")
    twice = {x for x, count in ran(rclient).items() if count > 1}
    claimed_inputs = {by_id[i].get() // 10 for i in in_claims}
    assert twice <= claimed_inputs, "only what the dead worker had claimed may run twice"


def test_two_workers_one_killed_the_survivor_finishes(rel, start_worker, rclient):
    n = 2000
    results = [rel.work.delay(x=i) for i in range(n)]
    doomed = start_worker("tests.apps.reliable", "--pool", "solo")
    start_worker("tests.apps.reliable", "--pool", "solo")
    wait_until(lambda: rclient.llen("reliable:ran") >= 200, 60, "progress")
    doomed.stop(signal.SIGKILL)
    assert ResultSet(results).get(timeout=120) == [i * 10 for i in range(n)]


def test_redis_connections_killed_repeatedly_all_tasks_complete(rel, start_worker, rclient):
    start_worker("tests.apps.reliable", "--pool", "solo").ready()
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        admin = redis.Redis.from_url(rel.URL)
        while not stop.wait(0.25) and len(kills) < 40:
            kills.append(admin.client_kill_filter(_type="normal", skipme=True))

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        results = [rel.work.delay(x=i) for i in range(2000)]

        def all_done() -> bool:
            # Poll the stored metas rather than block on pub/sub: the client's own connections are killed too.
            try:
                return all_succeeded(rclient, [r.id for r in results])
            except redis.ConnectionError:
                return False

        wait_until(all_done, 90, "every task")
    finally:
        stop.set()
        thread.join()
    assert sum(kills) > 5, f"connections were hardly killed: {kills}"
    assert [r.get(timeout=10) for r in results] == [i * 10 for i in range(2000)]


def test_message_that_kills_every_consumer_is_dead_lettered_and_fails(rel, start_worker, rclient):
    inputs = [f"item{i}" for i in range(20)]
    inputs[7] = "crash"
    results = [rel.crashy.delay(x=v) for v in inputs]
    poison = results[7]
    deaths = 0

    def crashed_or_finished(proc: subprocess.Popen[bytes]) -> bool:
        # The worker either dies on the poison message or lives until every task is settled.
        return proc.poll() is not None or all(r.ready() for r in results)

    for _ in range(10):
        proc = start_worker("tests.apps.reliable", "--pool", "solo").proc
        wait_until(functools.partial(crashed_or_finished, proc), 60, "crash or finish")
        if proc.poll() is None:
            break
        deaths += 1
    # Its batch (at most 16) comes back in halves until it is alone (at most 4 more deaths), then it dies alone
    # max_deliveries (3) times; its neighbours go on in batches and are never dead-lettered.
    assert 3 < deaths <= 3 + 4, f"expected log2(batch) + 3 deaths before the dead letter, got {deaths}"
    with pytest.raises(MessageError, match="dead-lettered after 3 deliveries"):
        poison.get(timeout=10)
    assert [r.get(timeout=10) for i, r in enumerate(results) if i != 7] == [v.upper() for v in inputs if v != "crash"]
    dead = rclient.lrange(QueueKeys(rel.crashy.batching.queue).dead, 0, -1)
    assert any(b"never finished" in entry and poison.id.encode() in entry for entry in dead)


def test_poison_input_is_bisected_out_of_a_batch_of_64(rel, start_worker, rclient):
    results = [rel.poison.delay(x=i) for i in range(64)]  # queued before the worker: one batch of 64
    start_worker("tests.apps.reliable", "--pool", "solo")
    for i, r in enumerate(results):
        if i == 13:
            with pytest.raises(rel.PoisonError, match="13 is poison"):
                r.get(timeout=60)
        else:
            assert r.get(timeout=60) == i + 1
    calls = int(rclient.get("reliable:poison_calls"))
    assert calls == 1 + 12, f"{calls - 1} extra model calls to isolate one culprit among 64"


def test_warm_shutdown_loses_nothing_and_runs_nothing_twice(rel, start_worker, rclient):
    n = 2000
    results = [rel.work.delay(x=i) for i in range(n)]
    worker = start_worker("tests.apps.reliable", "--pool", "solo")
    wait_until(lambda: rclient.llen("reliable:ran") >= 200, 60, "progress")
    assert worker.stop(signal.SIGTERM, timeout_s=30) == 0, worker.output()
    keys = QueueKeys(rel.work.batching.queue)
    assert rclient.zcard(keys.claims) == 0, "warm shutdown left claims behind"
    done = sum(r.state == states.SUCCESS for r in results)
    assert done + rclient.llen(keys.main) == n, "every task is either finished or back in the queue"
    assert "gave" in worker.output() or done == n
    start_worker("tests.apps.reliable", "--pool", "solo")
    values = gather(results, timeout=120)
    wrong = [(i, v, results[i].state, results[i].result) for i, v in enumerate(values) if v != i * 10]
    assert not wrong, wrong[:5]
    assert max(ran(rclient).values()) == 1, "a task ran twice although no worker crashed"


@pytest.fixture(scope="module")
def reliable_worker(rel, redis_url, tmp_path_factory):
    from tests.conftest import Worker

    worker = Worker("tests.apps.reliable", redis_url, tmp_path_factory.mktemp("rel") / "w.log", "--pool", "solo")
    worker.ready()
    yield worker
    worker.stop()


def test_hard_time_limit_fails_the_batch_on_time(rel, reliable_worker):
    start = time.monotonic()
    r = rel.stuck.delay(seconds=10)
    with pytest.raises(TimeLimitExceeded):
        r.get(timeout=30)
    assert time.monotonic() - start < 6, "the 1 s hard limit did not cut a 10 s call short"


def test_soft_time_limit_interrupts_the_model(rel, reliable_worker):
    r = rel.busy.delay(seconds=5)
    with pytest.raises(SoftTimeLimitExceeded):
        r.get(timeout=30)


def test_revoked_countdown_task_is_revoked_not_run(rel, reliable_worker, rclient):
    r = rel.work.apply_async(kwargs={"x": 424242}, countdown=1.5)
    r.revoke()
    keep = rel.work.apply_async(kwargs={"x": 7}, countdown=1.5)
    assert keep.get(timeout=30) == 70
    wait_until(lambda: r.state == states.REVOKED, 10, "the revoked task to be settled")
    assert 424242 not in ran(rclient)


def test_ignore_result_runs_but_stores_nothing(rel, reliable_worker, rclient):
    r = rel.quiet.delay(x=5)
    wait_until(lambda: rclient.llen("reliable:quiet") == 1, 30, "the task to run")
    assert not rclient.exists(rel.app.backend.get_key_for_task(r.id))


def test_redis_restart_mid_run_the_worker_rides_it_out(rel, tmp_path):
    """A persistent Redis (AOF) restarted under a running worker: one outage line, no crash, every task done."""
    import os
    import sys

    from batching.redis_server import find_redis_server, free_port
    from tests.conftest import Worker

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _pings(url), 10, "redis-server to start")
        return proc

    server = start_redis()
    client = subprocess.run(  # submit from a process bound to this Redis before any worker runs; ids, one a line
        [sys.executable, "-c", "from tests.apps import reliable as r\n"
         "for i in range(3000): print(r.work.delay(x=i).id)"],
        env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=True,
    )
    ids = client.stdout.split()
    backend = redis.Redis.from_url(url)
    worker = Worker("tests.apps.reliable", url, tmp_path / "w.log", "--pool", "solo")
    try:
        wait_until(lambda: backend.llen("reliable:ran") >= 300, 60, "progress before the restart")
        server.terminate()
        server.wait(10)
        server = start_redis()
        backend = redis.Redis.from_url(url)
        wait_until(lambda: all_succeeded(backend, ids), 90, "every task after restart")
        wait_until(lambda: "Redis is back" in worker.output(), 30, "the worker to log that Redis is back")
        assert worker.proc.poll() is None, "the worker died with Redis"
        log = worker.output()
        for task in ("work", "poison", "quiet"):  # one line per outage and consumer, however long it lasted
            assert log.count(f"batching tests.apps.reliable.{task}: Redis unreachable") <= 1, log[-3000:]
    finally:
        worker.stop()
        server.terminate()
        server.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.ConnectionError:
        return False
