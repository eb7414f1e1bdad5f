"""No silent unbatching: however a batched task's message is sent, it is run in a batch by the consumer — or
refused with what to do instead — never one item at a time in a pool process, which would build the model there."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from types import ModuleType

import pytest
import redis
from celery import canvas

from batching import UnbatchedCallError
from batching.store.keys import QueueKeys
from tests.conftest import ROOT
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

APP = "tests.apps.controlled"


@pytest.fixture
def ctl(redis_url: str, rclient: redis.Redis) -> ModuleType:
    module = importlib.import_module(APP)
    rclient.delete("ctl:echo_sizes", "ctl:echo_ran", "ctl:scorer_built_in", "celery",
                   *QueueKeys("batching.ctl.echo").lists)
    return module


@pytest.fixture
def slim(redis_url: str) -> ModuleType:
    return importlib.import_module("tests.apps.slim")


def test_send_task_by_name_from_a_client_that_never_imported_the_task_is_batched(ctl, slim, start_worker, rclient):
    results = [slim.app.send_task("ctl.echo", kwargs={"x": f"n{i}"}) for i in range(20)]  # to the default queue
    worker = start_worker(APP, "--pool", "solo").ready()
    assert [r.get(timeout=30) for r in results] == [f"n{i}" for i in range(20)]
    sizes = [int(n) for n in rclient.lrange("ctl:echo_sizes", 0, -1)]
    assert sum(sizes) == 20 and max(sizes) > 1, sizes  # run in batches, not one at a time
    assert "forwarded it there" in worker.output()  # and the extra hop is not silent


def test_a_client_that_imported_the_task_routes_send_task_straight_to_the_batch_queue(ctl, rclient):
    batch_list, default_list = QueueKeys("batching.ctl.echo").main, "celery"
    before = rclient.llen(batch_list), rclient.llen(default_list)
    ctl.app.send_task("ctl.echo", kwargs={"x": "routed"})
    assert (rclient.llen(batch_list), rclient.llen(default_list)) == (before[0] + 1, before[1])
    rclient.delete(batch_list)


def test_beat_from_a_slim_app_reaches_the_batch_consumer(ctl, start_worker, redis_url, rclient, tmp_path):
    start_worker(APP, "--pool", "solo").ready()
    stats = QueueKeys("batching.ctl.echo").stats
    served = int(rclient.hget(stats, "requests") or 0)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.slim", "beat", "-s", str(tmp_path / "schedule"),
         "-l", "INFO"], cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_until(lambda: b"from-beat" in rclient.lrange("ctl:echo_ran", 0, -1), 30, "beat's task to be run")
        # run by the batch consumer (which counts what it serves), not by the pool
        wait_until(lambda: int(rclient.hget(stats, "requests") or 0) > served, 10, "the consumer to count it")
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)


def test_map_starmap_and_chunks_are_refused_in_the_client_with_what_to_use(ctl):
    for call in (lambda: ctl.echo.map([1, 2]), lambda: ctl.echo.starmap([(1,), (2,)]),
                 lambda: ctl.echo.chunks([(1,), (2,)], 1)):
        with pytest.raises(UnbatchedCallError, match=r"group\(echo\.s\(x\) for x in xs\)"):
            call()


def test_map_and_chunks_sent_anyway_fail_in_the_pool_and_never_build_the_model_there(ctl, start_worker, rclient):
    """celery.map / celery.starmap built by hand still reach a pool process: they fail there with the advice, and
    the model is only ever built by the consumer in the worker's main process (prefork pool)."""
    worker = start_worker(APP, "--pool", "prefork", "-c", "1").ready()
    assert ctl.scorer.delay(x=1).get(timeout=30) == 1.5
    mapped = canvas.xmap(ctl.scorer.s(), [1, 2]).apply_async()
    with pytest.raises(UnbatchedCallError, match=r"group\(scorer\.s\(x\) for x in xs\)"):
        mapped.get(timeout=30)
    chunked = canvas.chunks(ctl.scorer.s(), [(3,), (4,)], 1).apply_async()
    with pytest.raises(UnbatchedCallError):
        chunked.get(timeout=30)
    by_name = ctl.app.send_task("ctl.scorer", kwargs={"x": 2}, queue="celery")  # lands on the pool's queue
    assert by_name.get(timeout=30) == 2.5
    assert {int(p) for p in rclient.lrange("ctl:scorer_built_in", 0, -1)} == {worker.proc.pid}
