"""``celery -A app control batching_set --task NAME key=value ...`` against two running workers, through the real
``celery`` command: both change how they batch at once, ``batching status`` shows what each uses, and a refused
change leaves everything as it was.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest
import redis

from batching import ConfigurationError
from batching.tuning import parse, retuned, values
from tests.conftest import ROOT
from tests.test_flush import fresh_app, metrics_worker, scrape, status
from tests.waiting import poll_until

APP = "tests.apps.tuned"
TASK = "flush.tuned"


@pytest.fixture
def app(redis_url: str, rclient: redis.Redis) -> ModuleType:
    return fresh_app(rclient)


def celery(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", APP, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "REDIS_URL": redis_url})


def sizes(port: int) -> tuple[float, float]:
    """(batches run, batches of more than 8) by one worker's ``batching_batch_size`` histogram, all reasons."""
    m = scrape(port)
    total = over_8 = 0.0
    for (name, labels), value in m.items():
        got = dict(labels)
        if name == "batching_batch_size_bucket" and got["task"] == TASK:
            if got["le"] == "+Inf":
                total += value
                over_8 += value
            elif got["le"] == "8.0":
                over_8 -= value
    return total, over_8


def run_round(app: ModuleType, n: int) -> None:
    results = app.tuned.submit_many([{"x": i} for i in range(n)])
    assert [r.get(timeout=60) for r in results] == list(range(n))


@pytest.mark.integration
def test_batching_set_changes_what_both_running_workers_do(app, start_worker, redis_url):
    (a, port_a), (b, port_b) = metrics_worker(start_worker), metrics_worker(start_worker)
    nodes = f"{a.nodename},{b.nodename}"

    run_round(app, 256)  # batch_size 32
    before = {port: sizes(port) for port in (port_a, port_b)}
    for total, over_8 in before.values():
        assert total >= 1 and over_8 >= 1, before  # each worker ran batches, and ones larger than 8

    done = celery(redis_url, "control", "batching_set", "--task", TASK, "batch_size=8", "max_delay=0.005",
                  "-d", nodes, "-t", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    for node in (a.nodename, b.nodename):
        assert f"{node}: OK" in done.stdout, done.stdout
    assert done.stdout.count(f"{TASK}: batch_size=8 max_delay=0.005 (was batch_size=32 max_delay=0.3)") == 2

    live = poll_until(lambda: (t := status(redis_url)[TASK]["tuning"]) and len(t) == 2 and t, 10,
                      "both workers to report their values")
    assert list(live.values()) == [{"batch_size": 8, "max_delay": 0.005}] * 2

    run_round(app, 64)
    for port in (port_a, port_b):
        total, over_8 = sizes(port)
        assert total > before[port][0], f"worker on {port} ran no batch after the change"
        assert over_8 == before[port][1], f"worker on {port} ran a batch larger than 8 after the change"
    assert a.output().count("now batch_size=8 max_delay=0.005 (was batch_size=32 max_delay=0.3)") == 1

    # Refused, with the reason in each worker's reply; nothing changes.
    for args, why in [
        (("batch_size=0",), "batch_size must be an integer >= 1, got 0"),
        (("max_delay=soon",), "max_delay must be a number, got 'soon'"),
        (("batch_size=4", "colour=red"), "cannot change 'colour'"),
        (("--task", "flush.nope", "batch_size=4"), "'flush.nope' is not a batched task of this worker"),
    ]:
        task = () if "--task" in args else ("--task", TASK)
        done = celery(redis_url, "control", "batching_set", *task, *args, "-d", nodes, "-t", "10", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        replies = json.loads(done.stdout)
        assert len(replies) == 2, replies
        for reply in replies:
            (answer,) = reply.values()
            assert "refused, nothing changed" in answer["error"] and why in answer["error"], answer
    assert list(status(redis_url)[TASK]["tuning"].values()) == [{"batch_size": 8, "max_delay": 0.005}] * 2
    counted = {port: sizes(port) for port in (port_a, port_b)}
    run_round(app, 32)
    assert sum(sizes(port)[0] - counted[port][0] for port in (port_a, port_b)) >= 4  # still batches of 8 at most
    assert all(sizes(port)[1] == counted[port][1] for port in (port_a, port_b))

    # The same from Python, as the README shows it
    replies = app.app.control.broadcast("batching_set", arguments={"task": TASK, "settings": {"batch_size": 16}},
                                        reply=True, destination=[a.nodename, b.nodename], timeout=10)
    assert sorted(next(iter(r.values()))["ok"] for r in replies) == [
        f"{TASK}: batch_size=16 max_delay=0.005 (was batch_size=8 max_delay=0.005)"] * 2
    poll_until(lambda: list(status(redis_url)[TASK]["tuning"].values()) == [{"batch_size": 16, "max_delay": 0.005}] * 2,
               10, "both workers to report batch_size 16")

    # --task belongs to batching_set alone: another command refuses it rather than ignoring it
    done = celery(redis_url, "control", "rate_limit", "--task", TASK, "flush.tuned", "5/s", "-d", nodes)
    assert done.returncode != 0 and "--task is an option of batching_set only" in done.stderr


def test_arguments_parse_as_the_cli_sends_them_and_bad_ones_are_refused(redis_url):
    assert parse(["task=flush.tuned", "batch_size=64", "max_delay=0.005"]) == (
        "flush.tuned", {"batch_size": 64, "max_delay": 0.005})
    assert parse({"max_delay": 0}, task="flush.tuned") == ("flush.tuned", {"max_delay": 0})
    for bad, why in [(["batch_size=64"], "name the batched task"), (["task=t"], "nothing to change"),
                     (["task=t", "batch_size"], "expected key=value"), (["task=t", "batch_size=1.5"], "an integer"),
                     (["task=t", "lease_s=3"], "cannot change 'lease_s'")]:
        with pytest.raises(ConfigurationError, match=why):
            parse(bad)


def test_retuned_settings_go_through_the_checks_batched_runs(redis_url):
    settings = importlib.import_module(APP).tuned.batching
    new = retuned(settings, {"batch_size": 8})
    assert (new.policy.batch_size, new.policy.max_delay_s) == (8, 0.3)
    assert (settings.policy.batch_size, new.queue, new.spec) == (32, settings.queue, settings.spec)
    for bad in ({"batch_size": 0}, {"batch_size": True}, {"max_delay": -1}, {"max_delay": float("nan")},
                {"max_delay": 3600}):
        with pytest.raises(ConfigurationError):
            retuned(settings, bad)


def test_a_cost_budget_is_retuned_through_the_checks_cost_budgets_run() -> None:
    from celery import Celery

    from batching import batched

    app = Celery("tuned_cost", broker="redis://127.0.0.1:1/0")

    @batched(app, batch_size=16, max_delay=0.05, cost=lambda text: len(text), max_batch_cost=100, bucket=True)
    def lengths(text):
        return [len(t) for t in text]

    settings = lengths.batching
    assert values(settings) == {"batch_size": 16, "max_delay": 0.05, "max_batch_cost": 100.0}
    new = retuned(settings, {"max_batch_cost": 40})
    assert new.cost is not None and new.cost.max_batch_cost == 40.0
    assert (new.cost.fn, new.cost.bucket) == (settings.cost.fn, True)
    for bad in ({"max_batch_cost": 0}, {"max_batch_cost": float("inf")}, {"max_delay": 0}):  # bucketing needs a delay
        with pytest.raises(ConfigurationError):
            retuned(settings, bad)
    plain = importlib.import_module(APP).tuned.batching
    with pytest.raises(ConfigurationError, match="no cost= function"):
        retuned(plain, {"max_batch_cost": 10})
