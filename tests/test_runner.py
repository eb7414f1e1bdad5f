"""``ModelRunner``: one batch through the model, an outcome per item, handed on exactly once — also when the hard
time limit wins the race against the model — and ``TimeLimits.for_batch``, which picks the limits it runs under.

Batches are built in memory (no Redis); a test that needs the model to outlive a limit blocks it on an Event and
waits for the delivery itself, never for a fixed time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import states
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from batching.codec import Request
from batching.merge import CallSpec
from batching.model import ModelHandle
from batching.policy import FlushPolicy
from batching.settings import BatchSettings
from batching.store.queue import Claim
from batching.worker import limits as limits_module
from batching.worker.batch import Batch, Item
from batching.worker.limits import TimeLimits
from batching.worker.request import TaskRequest
from batching.worker.runner import ModelRunner
from tests.waiting import wait_until

TASK = "shop.double"


def double(x: list[int]) -> list[Any]:
    return [v * 2 for v in x]


def settings_for(fn: Callable[..., Any], **options: Any) -> BatchSettings:
    return BatchSettings(name=TASK, queue=f"batching.{TASK}", spec=CallSpec.from_callable(fn),
                         policy=FlushPolicy(8, 0.0), **options)


def batch_of(*xs: int, headers: dict[str, Any] | None = None) -> Batch:
    batch = Batch(Claim("claim-1"))
    for n, x in enumerate(xs):
        request = Request(id=f"t{n}", task=TASK, args=[x], kwargs={}, headers=dict(headers or {}), properties={})
        batch.items.append(Item(TaskRequest(request, "w1@box", f"batching.{TASK}", False)))
    return batch


def states_of(batch: Batch) -> list[str]:
    return [item.outcome.state for item in batch.items if item.outcome is not None]


def values_of(batch: Batch) -> list[Any]:
    return [item.outcome.value for item in batch.items if item.outcome is not None]


class Deliveries:
    """A ``deliver`` that also notes which thread handed each batch on."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.threads: list[threading.Thread] = []
        self.arrived = threading.Event()

    def __call__(self, batch: Batch) -> None:
        self.threads.append(threading.current_thread())
        self.batches.append(batch)
        self.arrived.set()


# -- the model answers --------------------------------------------------------------------------------------------


def test_results_land_on_their_items_in_order_and_the_batch_is_delivered_once() -> None:
    delivered: list[Batch] = []
    batch = batch_of(1, 2, 3)

    ModelRunner(settings_for(double), ModelHandle(fn=double), delivered.append).run(batch)

    assert delivered == [batch]
    assert states_of(batch) == [states.SUCCESS] * 3
    assert values_of(batch) == [2, 4, 6]
    for item in batch.items:
        assert item.outcome is not None
        assert (item.outcome.task_id, item.outcome.request) == (item.request.id, item.request)
    assert batch.started_at is not None


def test_an_exception_in_the_results_fails_only_its_item() -> None:
    error = ValueError("odd one out")
    delivered: list[Batch] = []
    batch = batch_of(1, 2, 3)

    def one_bad(x: list[int]) -> list[Any]:
        return [v if v != 2 else error for v in x]

    ModelRunner(settings_for(one_bad), ModelHandle(fn=one_bad), delivered.append).run(batch)

    assert delivered == [batch]
    assert states_of(batch) == [states.SUCCESS, states.FAILURE, states.SUCCESS]
    assert values_of(batch) == [1, error, 3]


def poison_at_13(calls: list[list[int]]) -> Callable[[list[int]], list[int]]:
    def model(x: list[int]) -> list[int]:
        calls.append(list(x))
        if 13 in x:
            raise ValueError("13 is poison")
        return x

    return model


def test_a_model_that_raises_is_bisected_so_only_the_culprit_fails() -> None:
    calls: list[list[int]] = []
    model = poison_at_13(calls)
    delivered: list[Batch] = []
    batch = batch_of(1, 13, 3, 4)

    ModelRunner(settings_for(model), ModelHandle(fn=model), delivered.append).run(batch)

    assert delivered == [batch]

    assert states_of(batch) == [states.SUCCESS, states.FAILURE, states.SUCCESS, states.SUCCESS]
    values = values_of(batch)
    assert [values[0], values[2], values[3]] == [1, 3, 4]
    assert type(values[1]) is ValueError
    assert calls == [[1, 13, 3, 4], [1, 13], [3, 4], [1], [13]]


def test_without_isolate_errors_a_model_that_raises_fails_the_whole_batch() -> None:
    calls: list[list[int]] = []
    model = poison_at_13(calls)
    delivered: list[Batch] = []
    batch = batch_of(1, 13, 3)

    ModelRunner(settings_for(model, isolate_errors=False), ModelHandle(fn=model), delivered.append).run(batch)

    assert delivered == [batch]

    assert states_of(batch) == [states.FAILURE] * 3
    errors = values_of(batch)
    assert type(errors[0]) is ValueError
    assert errors[0] is errors[1] is errors[2]
    assert calls == [[1, 13, 3]]


def test_a_model_that_cannot_be_built_fails_every_item_and_the_next_batch_tries_again(caplog) -> None:
    attempts: list[int] = []

    class Model:
        def run_batch(self, x: list[int]) -> list[int]:
            return x

    def factory() -> Model:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("no GPU yet")
        return Model()

    delivered: list[Batch] = []
    runner = ModelRunner(settings_for(double), ModelHandle(factory=factory), delivered.append)
    first, second = batch_of(1, 2), batch_of(3)

    runner.run(first)
    runner.run(second)

    assert delivered == [first, second]
    assert states_of(first) == [states.FAILURE] * 2
    assert [type(v) for v in values_of(first)] == [RuntimeError] * 2
    assert "building the model failed" in caplog.text
    assert (states_of(second), values_of(second)) == ([states.SUCCESS], [3])
    assert len(attempts) == 2


# -- time limits ---------------------------------------------------------------------------------------------------


class Blocked:
    """A model whose call holds until ``gate`` is set: longer than any time limit under test."""

    def __init__(self) -> None:
        self.gate, self.returned = threading.Event(), threading.Event()

    def __call__(self, x: list[int]) -> list[int]:
        self.gate.wait(30)
        self.returned.set()
        return x


def in_model_thread(runner: ModelRunner, batch: Batch) -> threading.Thread:
    thread = threading.Thread(target=runner.run, args=(batch,), name="model")
    thread.start()
    return thread


def test_hard_time_limit_fails_the_batch_on_time_and_the_late_answer_is_discarded(caplog) -> None:
    model, deliveries, batch = Blocked(), Deliveries(), batch_of(1, 2)
    model_thread = in_model_thread(ModelRunner(settings_for(model, time_limit=0.2), ModelHandle(fn=model),
                                               deliveries), batch)
    try:
        wait_until(lambda: deliveries.batches, 10, "the hard time limit to fail the batch")
        assert not model.returned.is_set()
        assert deliveries.batches == [batch]
        assert isinstance(deliveries.threads[0], threading.Timer)
        assert states_of(batch) == [states.FAILURE] * 2
        errors = values_of(batch)
        assert [type(e) for e in errors] == [TimeLimitExceeded] * 2
        assert "hard time limit (0.2s)" in str(errors[0])
    finally:
        model.gate.set()
        model_thread.join(10)

    assert not model_thread.is_alive()
    assert model.returned.is_set()
    assert deliveries.batches == [batch]
    assert values_of(batch) == errors
    late = [r for r in caplog.records if "returned after its hard time limit" in r.getMessage()]
    assert [r.levelno for r in late] == [logging.WARNING]


def test_a_model_that_answers_within_the_hard_limit_wins_and_the_timer_never_delivers() -> None:
    timers_before = {t for t in threading.enumerate() if isinstance(t, threading.Timer)}
    deliveries, batch = Deliveries(), batch_of(1, 2)

    ModelRunner(settings_for(double, time_limit=30.0), ModelHandle(fn=double), deliveries).run(batch)

    assert deliveries.batches == [batch]
    assert deliveries.threads == [threading.current_thread()]
    assert (states_of(batch), values_of(batch)) == ([states.SUCCESS] * 2, [2, 4])
    wait_until(lambda: not [t for t in threading.enumerate() if isinstance(t, threading.Timer)
                            and t not in timers_before], 10, "the cancelled hard-limit timer to end")
    assert deliveries.batches == [batch]


def test_soft_time_limit_interrupts_a_python_level_model() -> None:
    calls: list[int] = []

    def spin(x: list[int]) -> list[int]:
        calls.append(len(x))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pass
        return x

    delivered: list[Batch] = []
    batch = batch_of(1, 2, 3)
    runner = ModelRunner(settings_for(spin, soft_time_limit=0.2), ModelHandle(fn=spin), delivered.append)
    in_model_thread(runner, batch).join(20)

    assert delivered == [batch]
    assert states_of(batch) == [states.FAILURE] * 3
    assert [type(v) for v in values_of(batch)] == [SoftTimeLimitExceeded] * 3
    assert calls == [3]  # a time limit says nothing about the inputs: never bisected


def test_a_request_time_limit_tighter_than_the_task_s_applies_to_its_batch() -> None:
    model, delivered, batch = Blocked(), list[Batch](), batch_of(1, 2, headers={"timelimit": [0.2, None]})
    model_thread = in_model_thread(ModelRunner(settings_for(model, time_limit=60.0), ModelHandle(fn=model),
                                               delivered.append), batch)
    try:
        wait_until(lambda: delivered, 10, "the request's hard time limit to fail the batch")
        assert [type(v) for v in values_of(batch)] == [TimeLimitExceeded] * 2
    finally:
        model.gate.set()
        model_thread.join(10)
    assert delivered == [batch]


def test_a_soft_limit_that_fires_as_the_model_returns_never_escapes_the_run(monkeypatch) -> None:
    returned, deliveries = threading.Event(), Deliveries()
    raise_in_thread = limits_module.raise_in_thread

    def late(ident: int, exc_type: type[BaseException]) -> bool:  # the timer fires as the model returns
        returned.wait(10)
        return raise_in_thread(ident, exc_type)

    def model(x: list[int]) -> list[int]:
        returned.set()
        return x

    monkeypatch.setattr(limits_module, "raise_in_thread", late)
    escaped: list[BaseException] = []
    runner = ModelRunner(settings_for(model, soft_time_limit=0.01), ModelHandle(fn=model), deliveries)

    def model_loop() -> None:  # as the consumer's: run the batch, then go on with other work
        try:
            runner.run(batch_of(1, 2))
            for _ in range(100_000):  # plenty of bytecode for a pending exception to land in
                pass
        except SoftTimeLimitExceeded as exc:
            escaped.append(exc)

    thread = threading.Thread(target=model_loop)
    thread.start()
    thread.join(30)

    assert escaped == []
    (batch,) = deliveries.batches  # delivered once: as it returned, or failed by the limit if that landed first
    assert states_of(batch) in ([states.SUCCESS] * 2, [states.FAILURE] * 2)


def test_a_soft_limit_timer_that_runs_after_the_call_does_nothing(monkeypatch) -> None:
    calls: list[int] = []

    def record(ident: int, exc_type: type[BaseException]) -> bool:
        calls.append(ident)
        return True

    monkeypatch.setattr(limits_module, "raise_in_thread", record)
    watchdog = limits_module.Watchdog(TimeLimits(soft=60.0), lambda: None)
    with watchdog:
        pass
    watchdog._soft()  # a timer thread that got past Timer.cancel() before it was called
    assert calls == []


# -- TimeLimits.for_batch -----------------------------------------------------------------------------------------


def limits(timelimits: list[Any], *, hard: Any = None, soft: Any = None) -> TimeLimits:
    return TimeLimits.for_batch(settings_for(double, time_limit=hard, soft_time_limit=soft), timelimits)


def test_the_tightest_of_the_task_s_and_the_requests_limits_wins_each_limit_separately() -> None:
    assert limits([None, None], hard=10, soft=5) == TimeLimits(soft=5.0, hard=10.0)
    assert limits([[8, 6], [3, None], (12, 1)], hard=10, soft=5) == TimeLimits(soft=1.0, hard=3.0)
    assert limits([[2.5, 1.5]]) == TimeLimits(soft=1.5, hard=2.5)


@pytest.mark.parametrize("junk", [
    None, "3", 3, [3], [3, 2, 1], {"hard": 1}, [None, None], ["3", "2"], [float("nan"), float("nan")],
    [float("inf"), float("-inf")], [-1, -2], [0, 0], [True, True], [1e300, 1e300],
])
def test_junk_request_limits_are_ignored(junk: Any) -> None:
    assert limits([junk], hard=10, soft=5) == TimeLimits(soft=5.0, hard=10.0)
    assert not limits([junk])


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -1, 0, True])
def test_junk_task_limits_mean_no_limit(junk: Any) -> None:
    assert limits([], hard=junk, soft=junk) == TimeLimits(None, None)
    assert limits([[4, 2]], hard=junk, soft=junk) == TimeLimits(soft=2.0, hard=4.0)


def test_each_batch_is_logged_at_debug_with_why_it_was_flushed(caplog) -> None:
    batch = batch_of(1, 2, 3)
    batch.flush_reason = "max_delay"
    with caplog.at_level(logging.DEBUG, logger="batching.worker.runner"):
        ModelRunner(settings_for(double), ModelHandle(fn=double), lambda b: None).run(batch)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert line.startswith(f"batching {TASK}: ran a batch of 3 in ") and line.endswith(" ms (flush: max_delay)")
