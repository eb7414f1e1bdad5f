"""Defining batched tasks: the ``shared_task``-style form bound to the current app at use (under a real worker),
and the misuses refused where the task is defined."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import redis
from celery import Celery

from batching import BatchedTask, ConfigurationError, batched, shared_batched
from tests.conftest import Worker


def echo(x: Any) -> Any:
    return x


def test_base_batchedtask_without_batched_is_refused_at_definition() -> None:
    app = Celery("definition", set_as_current=False)
    app.finalize()  # Celery creates a finalized app's tasks at the decorator
    with pytest.raises(ConfigurationError, match=r"base=BatchedTask without @batched.*@batched\(app, batch_size="):
        # shared=False: Celery would otherwise try again on every app finalized later in this process
        app.task(base=BatchedTask, name="definition.wrong", shared=False)(echo)
    assert "definition.wrong" not in app.tasks


def test_base_batchedtask_on_a_lazy_app_is_refused_when_celery_creates_the_task() -> None:
    app = Celery("lazy", set_as_current=False)
    task = app.task(base=BatchedTask, name="lazy.wrong", shared=False)(echo)  # a proxy: Celery defers creating it
    with pytest.raises(ConfigurationError, match="base=BatchedTask without @batched"):
        task.delay(1)


def test_subclassing_batchedtask_for_a_custom_base_is_allowed() -> None:
    class Base(BatchedTask):
        abstract = True

    assert issubclass(Base, BatchedTask)


@pytest.mark.parametrize("bad", ["5/x", "fast", -1])
def test_a_rate_limit_that_is_not_a_rate_is_refused_at_definition(bad: Any) -> None:
    app = Celery("rates", set_as_current=False)
    with pytest.raises(ConfigurationError, match="is not a rate"):
        batched(app, echo, name="rates.bad", rate_limit=bad)
    with pytest.raises(ConfigurationError, match="is not a rate"):
        shared_batched(echo, name="rates.bad", rate_limit=bad)


def test_shared_batched_checks_its_options_where_it_is_defined() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'batch_size'"):
        shared_batched(batch_sise=8)


def test_shared_batched_binds_to_each_app_including_apps_created_later() -> None:
    module = importlib.import_module("tests.apps.sharedtasks")
    app = Celery("later", set_as_current=False)
    app.finalize()
    task = app.tasks["tests.apps.sharedtasks.shout"]
    assert isinstance(task, BatchedTask) and task.app is app
    assert task.batching.queue == "batching.tests.apps.sharedtasks.shout"
    assert "batching.worker.bootstep:BatchingStep" in app.steps["worker"]
    assert app.amqp.router.route({}, "shared.double")["queue"].name == "batching.shared.double"
    app.set_current()
    assert module.shout.name == "tests.apps.sharedtasks.shout" and module.shout.app is app


@pytest.mark.integration
def test_shared_batched_runs_in_batches_under_a_worker_of_an_app_created_after_the_tasks(
        redis_url: str, start_worker: Any, rclient: redis.Redis) -> None:
    rclient.delete("shared:sizes")
    tasks = importlib.import_module("tests.apps.sharedtasks")
    late = importlib.import_module("tests.apps.late")
    late.app.set_current()  # what Django's celery.py does when it creates the app
    results = [tasks.shout.delay(text=f"t{i}") for i in range(12)]
    doubled = tasks.double.delay(x=21)
    worker: Worker = start_worker("tests.apps.late", "--pool", "solo").ready()
    assert [r.get(timeout=30) for r in results] == [f"T{i}" for i in range(12)]
    assert doubled.get(timeout=30) == 42
    sizes = [int(n) for n in rclient.lrange("shared:sizes", 0, -1)]
    assert sum(sizes) == 12 and max(sizes) > 1, sizes
    assert "batching tests.apps.sharedtasks.shout: consuming queue 'batching.tests.apps.sharedtasks.shout'" in \
        worker.output()


@pytest.mark.integration
def test_a_worker_of_an_app_with_base_batchedtask_says_what_to_do(start_worker: Any) -> None:
    worker = start_worker("tests.apps.misbased", "--pool", "solo")
    assert worker.proc.wait(60) != 0
    assert "ConfigurationError: task 'tests.apps.misbased.predict' uses base=BatchedTask without @batched" in \
        worker.output()
    assert "@batched(app, batch_size=..., max_delay=...)" in worker.output()
