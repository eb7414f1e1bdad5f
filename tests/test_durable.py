"""Durable mode (``wait_replicas``): no acknowledged request is lost when Redis fails over to its replica.

Real servers: a master, its replica and a Sentinel on loopback; a real ``celery worker`` of ``tests/apps/durable``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

import batching
from batching import NotReplicated, submit_many
from tests.conftest import Worker
from tests.replicas import Topology, replicated_redis
from tests.waiting import poll_until, wait_until

pytestmark = pytest.mark.integration


def _app(monkeypatch: pytest.MonkeyPatch, url: str, runs: Path) -> ModuleType:
    """The durable app, imported in this process against ``url`` (re-imported: each test has its own servers)."""
    monkeypatch.setenv("BROKER_URL", url)
    monkeypatch.setenv("RUNS_LOG", str(runs))
    sys.modules.pop("tests.apps.durable", None)
    return importlib.import_module("tests.apps.durable")


def _worker(topo: Topology, url: str, runs: Path, tmp_path: Path) -> Worker:
    return Worker("tests.apps.durable", topo.master_url, tmp_path / "worker.log", "--pool", "solo",
                  env={"BROKER_URL": url, "RUNS_LOG": str(runs)}).ready()


def _ran(runs: Path) -> Counter[int]:
    return Counter(int(line) for line in runs.read_text().split()) if runs.exists() else Counter()


def test_a_send_waits_for_the_replica_and_a_silent_replica_pauses_the_queue_losing_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs.log"
    with replicated_redis(tmp_path) as topo:
        durable = _app(monkeypatch, topo.master_url, runs)
        worker = _worker(topo, topo.master_url, runs, tmp_path)
        try:
            assert durable.double.delay(x=1).get(timeout=30) == 2

            topo.signal("replica", signal.SIGSTOP)  # it stops acknowledging: no write can be confirmed
            with pytest.raises(NotReplicated, match=r"0 of the 1 replica\(s\)"):
                durable.double.apply_async(kwargs={"x": 2}, task_id="unconfirmed-2")
            with pytest.raises(NotReplicated):
                submit_many(durable.double, [{"x": 3}, {"x": 4}])
            with pytest.raises(NotReplicated):
                asyncio.run(_submit_async(durable.double, 5))
            # The messages are on the master; the consumer claims them but, unconfirmed, gives them back unrun.
            wait_until(lambda: "NotReplicated" in worker.output(), 10, "the consumer to log the unconfirmed claim")
            assert _ran(runs) == Counter({1: 1})

            topo.signal("replica", signal.SIGCONT)
            master = topo.client("master")
            wait_until(lambda: sorted(_ran(runs)) == [1, 2, 3, 4, 5], 30, "every sent request to run",
                       detail=lambda: str(_ran(runs)))
            stored: Any = poll_until(lambda: master.get("celery-task-meta-unconfirmed-2"), 10, "its result")
            meta = json.loads(stored)
            assert (meta["status"], meta["result"]) == ("SUCCESS", 4)
            # Given back unrun each time: nothing ran twice, no delivery was counted, nothing was dead-lettered.
            assert max(_ran(runs).values()) == 1
            assert master.llen("batching:dead:batching.durable.double") == 0
            assert not master.hgetall("batching:deliveries:batching.durable.double")
        finally:
            worker.stop()


async def _submit_async(task: Any, x: int) -> None:
    try:
        await batching.aio.submit(task, x=x)
    finally:
        await batching.aio.close()


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_a_failover_loses_no_acknowledged_request_in_durable_mode(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs.log"
    n = 400
    with replicated_redis(tmp_path, sentinel=True) as topo:
        durable = _app(monkeypatch, topo.sentinel_url, runs)
        worker = _worker(topo, topo.sentinel_url, runs, tmp_path)
        sent = threading.Event()
        errors: Counter[str] = Counter()

        def client() -> None:
            # What a careful client does in durable mode: a send that raised is resent with the same task id.
            for i in range(n):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        durable.double.apply_async(kwargs={"x": i}, task_id=f"t-{i}")
                        break
                    except Exception as exc:
                        errors[type(exc).__name__] += 1
                        assert time.monotonic() < deadline, f"request {i} could not be sent: {exc!r}"
                        time.sleep(0.1)
                if i == n // 4:
                    sent.set()
                time.sleep(0.004)

        sender = threading.Thread(target=client)
        try:
            sender.start()
            assert sent.wait(60)
            if how == "graceful":
                topo.sentinel().execute_command("SENTINEL", "FAILOVER", "mymaster")
            else:
                topo.signal("master", signal.SIGKILL)
            wait_until(lambda: topo.current_master().connection_pool.connection_kwargs["port"] == topo.replica_port,
                       30, "the Sentinel to promote the replica", interval=0.1)
            if how == "sigkill":
                # Nothing can be confirmed while the new master has no replica: the queue waits (clients get
                # NotReplicated) until the old master is back, as a replica of the new one.
                topo.restart_master()
            sender.join(120)
            assert not sender.is_alive()

            master = topo.current_master()
            keys = [f"celery-task-meta-t-{i}" for i in range(n)]

            def stored() -> list[Any] | None:
                with_results: list[Any] = master.mget(keys)
                return with_results if all(with_results) else None

            metas = poll_until(stored, 90, "every request's result on the new master",
                               detail=lambda: f"{sum(1 for m in master.mget(keys) if m)} of {n}; ran {len(_ran(runs))}")
            results = [json.loads(m) for m in metas]
            assert [r["status"] for r in results] == ["SUCCESS"] * n
            assert [r["result"] for r in results] == [2 * i for i in range(n)]
            twice = sum(1 for count in _ran(runs).values() if count > 1)
            mode = f"wait_replicas={durable.double.batching.wait_replicas}"
            print(f"\n{how} failover, {mode}: sent {n}, lost 0, ran twice {twice}, client send errors {dict(errors)}")
        finally:
            sender.join(5)
            worker.stop()


def test_durable_mode_is_checked_where_the_task_is_defined() -> None:
    from celery import Celery

    app = Celery("checked", broker="redis://127.0.0.1:1/0")
    with pytest.raises(batching.ConfigurationError, match="wait_replicas must be an integer >= 0"):
        batching.batched(app, wait_replicas=-1)(lambda x: x)
    with pytest.raises(batching.ConfigurationError, match="wait_timeout must be a number of seconds"):
        batching.batched(app, wait_replicas=1, wait_timeout=0)(lambda x: x)


def test_a_redis_error_reply_is_not_mistaken_for_a_confirmation(redis_url: str) -> None:
    from batching.store.replication import Replicas

    client = redis.Redis.from_url(redis_url)
    # No replica is attached to the test server: WAIT returns 0 at once... after the timeout.
    with pytest.raises(NotReplicated, match="0 of the 1 replica"):
        Replicas(1, 0.05).run(client, lambda pipe: pipe.set("durable:probe", 1), "a probe")
    assert Replicas(0).run(client, lambda pipe: pipe.incr("durable:count"), "a probe")[0] >= 1
