"""Model instances in processes of their own (``instances=N``), against real workers: where models are built, an
instance killed mid-batch, warm shutdown, recycling, inspect and revoke, metrics on the one endpoint.

The app's models record in Redis where they were built and which process ran each item (``tests/apps/instanced``).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from types import ModuleType

import pytest
import redis
from celery import Celery, states
from celery.exceptions import TaskRevokedError

from batching import ConfigurationError, batched
from tests.test_control import inspect, running
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration

APP = "tests.apps.instanced"


@pytest.fixture
def inst(redis_url: str, rclient: redis.Redis) -> ModuleType:
    module = importlib.import_module(APP)
    stale = list(rclient.scan_iter("inst:*"))
    if stale:
        rclient.delete(*stale)
    return module


def entries(rclient: redis.Redis, key: str) -> list[str]:
    return [e.decode() if isinstance(e, bytes) else e for e in rclient.lrange(key, 0, -1)]


def inits(rclient: redis.Redis, task: str) -> list[tuple[int, int]]:
    """(index, pid) of every instance process of ``task`` that started, in order; each also checks that its
    ``BATCHING_INSTANCE`` environment variable matched its index."""
    found = []
    for entry in entries(rclient, "inst:init"):
        name, index, pid, env_index = entry.split(":")
        if name == task:
            assert env_index == index
            found.append((int(index), int(pid)))
    return found


def builds(rclient: redis.Redis, model: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of every construction of ``model``."""
    return [(int(pid), int(ppid)) for name, pid, ppid in
            (e.split(":") for e in entries(rclient, "inst:built")) if name == model]


def runs(rclient: redis.Redis) -> Counter[int]:
    return Counter({int(k): int(v) for k, v in rclient.hgetall("inst:runs").items()})


def test_instance_options_are_checked_and_need_no_worker() -> None:
    app = Celery("inst-options", set_as_current=False)

    def echo(x):
        return x

    assert not batched(app, echo, name="o.one").batching.in_processes
    many = batched(app, echo, name="o.many", instances=3)
    assert (many.batching.instances, many.batching.in_processes) == (3, True)
    # Recycling needs a process of its own, even for one instance.
    assert batched(app, echo, name="o.recycled", max_memory_per_instance=500_000).batching.in_processes
    with pytest.raises(ConfigurationError, match="instances must be an integer >= 1, got True"):
        batched(app, echo, name="o.bad", instances=True)
    with pytest.raises(ConfigurationError, match=r"'instance' \(did you mean 'instances'\?\)"):
        batched(app, echo, name="o.typo", instance=2)


def test_models_are_built_in_the_instances_only_and_metrics_add_up_on_the_worker(inst, start_worker, rclient):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker(APP, "-c", "2", env={"BATCHING_METRICS_PORT": str(port),
                                               "BATCHING_METRICS_ADDR": "127.0.0.1"}).ready()
    results = inst.work.submit_many([{"x": i} for i in range(120)])
    plain = [inst.plain.delay(i) for i in range(8)]
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(120)]
    pool_pids = {r.get(timeout=30)[1] for r in plain}
    started = inits(rclient, "inst.work")
    assert sorted(index for index, _ in started) == [0, 1]
    instance_pids = {pid for _, pid in started}
    built = builds(rclient, "SlowModel")
    # Once per instance, in the instance, whose parent is the worker's main process; never in the main process
    # itself nor in a pool process.
    assert sorted(pid for pid, _ in built) == sorted(instance_pids)
    assert {ppid for _, ppid in built} == {worker.proc.pid}
    assert not instance_pids & (pool_pids | {worker.proc.pid})
    ran_by = {int(k): int(v) for k, v in rclient.hgetall("inst:ran_by").items()}
    assert set(ran_by) <= instance_pids and sum(ran_by.values()) == 120
    # Task signals: receivers connected at the app's import fire in the instance that ran the item.
    wait_until(lambda: sum(int(v) for v in rclient.hvals("inst:postrun")) == 120, 30, "every task_postrun")
    postrun = {k.decode(): int(v) for k, v in rclient.hgetall("inst:postrun").items()}
    assert postrun == {f"{pid}:SUCCESS": n for pid, n in ran_by.items()}
    # Celery's worker_process_init (where OpenTelemetry and Sentry are set up) is sent in each instance, as in a
    # pool process.
    assert instance_pids <= {int(p) for p in entries(rclient, "inst:process_init")}
    out = worker.output()
    for index, pid in started:
        assert f"instance {index} of 2 serving in process {pid}" in out
        assert f"INFO/Instance-{index}] batching: built the model SlowModel in process {pid}" in out

    def scraped() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        done = 'batching_items_total{outcome="succeeded",task="inst.work"} 120.0' in text
        return text if done else None

    text = poll_until(scraped, 30, "the instances' items on the worker's endpoint")
    sums = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("batching_batch_size_sum{") and 'task="inst.work"' in line]
    assert sum(sums) == 120.0  # summed over the flush reasons
    assert 'batching_queue_depth{task="inst.work"} 0.0' in text


def test_an_instance_killed_mid_batch_comes_back_and_nothing_is_lost(inst, start_worker, rclient):
    worker = start_worker(APP, "-c", "1", env={"INST_BATCH_S": "0.2"}).ready()
    results = inst.work.submit_many([{"x": i} for i in range(400)])
    started = poll_until(lambda: s if len(s := inits(rclient, "inst.work")) == 2 else None, 60,
                         "both instances to start")
    index, victim = started[0]
    survivor = started[1][1]
    wait_until(lambda: rclient.exists(f"inst:busy:{victim}"), 30, "the victim to run a batch")
    os.kill(victim, signal.SIGKILL)
    survivor_ran = int(rclient.hget("inst:ran_by", str(survivor)) or 0)
    # The worker goes on: plain tasks run, and the other instance keeps serving while the victim is down.
    assert inst.plain.delay(5).get(timeout=30)[0] == 5
    wait_until(lambda: int(rclient.hget("inst:ran_by", str(survivor)) or 0) > survivor_ran + 16, 30,
               "the surviving instance to keep serving")
    # The instance comes back, under the same index, in a new process.
    back = poll_until(lambda: next((pid for i, pid in inits(rclient, "inst.work")[2:] if i == index), None), 60,
                      "the killed instance to be started again")
    assert back not in (victim, survivor)
    assert [r.get(timeout=120) for r in results] == [2 * i for i in range(400)]
    assert all(r.state == states.SUCCESS for r in results)
    assert set(runs(rclient)) == set(range(400))  # every item ran; those of the killed batch ran again
    assert f"batching inst.work: instance {index} died (killed by signal SIGKILL)" in worker.output()
    assert worker.proc.poll() is None


def test_warm_shutdown_with_instances_loses_nothing_and_runs_nothing_twice(inst, start_worker, rclient):
    worker = start_worker(APP, "-c", "1", env={"INST_BATCH_S": "0.3"}).ready()
    results = inst.work.submit_many([{"x": i} for i in range(300)])
    wait_until(lambda: sum(runs(rclient).values()) >= 24, 60, "a few batches to run")
    assert worker.stop(signal.SIGTERM, timeout_s=60) == 0
    ran = runs(rclient)
    assert 24 <= sum(ran.values()) < 300 and max(ran.values()) == 1
    out = worker.output()
    # Every instance process of the app (inst.work's two, inst.gated's two, inst.recycled's and inst.leaky's one)
    # stopped warm.
    assert out.count("stopping: the worker is stopping") == 6
    assert "still busy at shutdown" not in out
    # Whatever had not run is still queued: a new worker runs it, and still nothing runs twice.
    start_worker(APP, "-c", "1").ready()
    assert [r.get(timeout=120) for r in results] == [2 * i for i in range(300)]
    assert runs(rclient) == Counter(range(300))


def test_a_recycled_instance_finishes_its_batch_and_a_new_one_takes_over(inst, start_worker, rclient):
    worker = start_worker(APP, "-c", "1").ready()
    results = inst.recycled.submit_many([{"x": 1000 + i} for i in range(50)])
    assert [r.get(timeout=120) for r in results] == [2 * (1000 + i) for i in range(50)]
    built = builds(rclient, "RecycledModel")
    # 10 requests each, counted per settled batch of 4; a recycled instance stops as at a warm shutdown, so it also
    # runs the batch that was forming then: at most 10 + 2 * 4 requests, at least 50 / 18 processes.
    assert len({pid for pid, _ in built}) >= 3
    assert runs(rclient) == Counter(range(1000, 1050))  # a recycled instance gives nothing back twice
    out = worker.output()
    served = [int(n) for n in re.findall(r"ended \(recycled after (\d+) request\(s\) \(max_tasks_per_instance=10\)\); "
                                         r"starting a new one", out)]
    assert served and all(10 <= n <= 18 for n in served), served
    # Above max_memory_per_instance (KiB of peak resident memory) after each batch: replaced after at most the
    # batch it settles and the one it runs meanwhile (the one claimed ahead goes back), so 4 batches need 2.
    leaky = inst.leaky.submit_many([{"x": 2000 + i} for i in range(16)])
    assert [r.get(timeout=120) for r in leaky] == [2 * (2000 + i) for i in range(16)]
    assert len(builds(rclient, "LeakyModel")) >= 2
    assert runs(rclient) == Counter([*range(1000, 1050), *range(2000, 2016)])
    assert re.search(r"ended \(recycled at \d+ KiB resident \(max_memory_per_instance=1\)\)", worker.output())
    assert "died" not in worker.output()


def test_inspect_and_revoke_reach_the_items_of_instance_processes(inst, start_worker, redis_url, rclient):
    worker = start_worker(APP, "-c", "1").ready()
    first = inst.gated.submit_many([{"x": v} for v in range(1, 9)])  # two batches of 4
    running(rclient, "inst:gated_ran", 4)
    instance_pids = {pid for _, pid in inits(rclient, "inst.gated")}

    def held() -> tuple[list, list] | None:
        # Each batch is running in an instance, or claimed as the next batch of a busy one: both are shown.
        active, reserved = inspect(redis_url, worker, "active"), inspect(redis_url, worker, "reserved")
        return (active, reserved) if len(active) + len(reserved) == 8 else None

    active, reserved = poll_until(held, 30, "the items to be shown as active or reserved")
    assert sorted(a["id"] for a in active + reserved) == sorted(r.id for r in first)
    assert len(active) in (4, 8) and {a["worker_pid"] for a in active} <= instance_pids
    running_item = next(r for r in first if r.id == active[0]["id"])
    assert inspect(redis_url, worker, "query_task", running_item.id)[running_item.id][0] == "active"
    if reserved:  # the next batch, claimed by a busy instance: its report is all the worker knows of it
        waiting_id = reserved[0]["id"]
        assert inspect(redis_url, worker, "query_task", waiting_id)[waiting_id][0] == "reserved"
    # terminate=True on a running item: dropped from its batch, REVOKED at once. A revoke that reaches the worker
    # before its item is sent: the instance that claims it settles it REVOKED without running it.
    inst.app.control.revoke(running_item.id, terminate=True, reply=True, destination=[worker.nodename], timeout=10)
    assert running_item.state == states.REVOKED
    doomed_id = "inst-revoked-before-sent"
    inst.app.control.revoke(doomed_id, reply=True, destination=[worker.nodename], timeout=10)
    doomed = inst.gated.apply_async(kwargs={"x": 100}, task_id=doomed_id)
    rclient.set(inst.GATE, 1)
    assert [r.get(timeout=30) for r in first if r is not running_item] == \
        [10 * v for v, r in zip(range(1, 9), first, strict=True) if r is not running_item]
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=30)
    wait_until(lambda: inspect(redis_url, worker, "active") == [], 30, "the batches to be settled")
    assert (running_item.state, doomed.state) == (states.REVOKED, states.REVOKED)
    assert 100 not in {int(v) for v in rclient.lrange("inst:gated_ran", 0, -1)}


def test_task_events_of_instances_are_sent_under_the_worker_name(inst, start_worker, rclient):
    worker = start_worker(APP, "-c", "1", "-E").ready()
    seen: list[dict] = []
    with inst.app.connection() as conn:
        receiver = inst.app.events.Receiver(conn, handlers={"*": seen.append})
        capture = receiver.itercapture(limit=None, timeout=1, wakeup=False)
        next(capture)  # listening before anything is sent
        results = inst.work.submit_many([{"x": i} for i in range(20)])
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(20)]
        ids = {r.id for r in results}

        def succeeded() -> set[str]:
            return {e["uuid"] for e in seen if e["type"] == "task-succeeded" and e.get("uuid") in ids}

        deadline = time.monotonic() + 30
        while succeeded() != ids and time.monotonic() < deadline:
            next(capture)
        assert succeeded() == ids
    mine = [e for e in seen if e.get("uuid") in ids]
    assert {e["hostname"] for e in mine} == {worker.nodename}
    received = {e["uuid"]: e for e in mine if e["type"] == "task-received"}
    assert set(received) == ids and {e["name"] for e in received.values()} == {"inst.work"}


def test_batching_set_reaches_the_instance_processes_and_their_replacements(inst, start_worker, rclient, redis_url):
    worker = start_worker(APP, "-c", "1", env={"INST_BATCH_S": "0.02"}).ready()
    started = poll_until(lambda: s if len(s := inits(rclient, "inst.work")) == 2 else None, 60,
                         "both instances to start")
    replies = inst.app.control.broadcast("batching_set", arguments={"task": "inst.work", "settings": {"batch_size": 3}},
                                         reply=True, destination=[worker.nodename], timeout=10)
    assert [next(iter(r.values())) for r in replies] == [
        {"ok": "inst.work: batch_size=3 max_delay=0.01 (was batch_size=8 max_delay=0.01)"}]

    def sizes() -> list[tuple[int, int]]:
        return [(int(pid), int(n)) for pid, n in (e.split(":") for e in entries(rclient, "inst:sizes:SlowModel"))]

    assert inst.work.submit_many([{"x": i} for i in range(120)])[-1].get(timeout=60) == 238
    ran = sizes()
    assert {pid for pid, _ in ran} == {pid for _, pid in started}  # both instances served
    assert max(n for _, n in ran) == 3
    # ``inspect stats`` counts what the instances ran, as it counts what runs in the worker's own process.
    assert inspect(redis_url, worker, "stats")["total"]["inst.work"] == 120
    # An instance started again (here: after a SIGKILL) serves with the changed values from its start.
    os.kill(started[0][1], signal.SIGKILL)
    back = poll_until(lambda: next((pid for i, pid in inits(rclient, "inst.work")[2:] if i == started[0][0]), None),
                      60, "the killed instance to be started again")
    rclient.delete("inst:sizes:SlowModel")
    results = inst.work.submit_many([{"x": i} for i in range(120)])
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(120)]
    wait_until(lambda: back in {pid for pid, _ in sizes()}, 30, "the new instance to serve")
    assert max(n for _, n in sizes()) == 3
