"""The in-process ``Batcher``: concurrent ``run()`` calls become ``run_batch`` calls; each caller gets its own outcome.

Batches are made deterministic without sleeping: either the flush delay is so long that only full batches run, or
the first batch is held at a gate while the test waits (on a semaphore, through the batcher's clock) until the other
callers are queued behind it.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import count
from typing import Any

import pytest

from batching.batcher import Batcher
from batching.errors import BatcherStopped, BatchResultError, MissingArgumentError

#: Upper bound on any single wait in these tests, in seconds; reaching it means a hang.
TIMEOUT_S = 10.0
#: A flush delay no test reaches: with it, only full batches run.
NEVER_S = 600.0

_caller_ids = count()


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """Call ``fn`` in a daemon "caller" thread; a call that hangs fails ``.result(TIMEOUT_S)`` instead of blocking."""
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the batcher hands even SystemExit back to the caller
            future.set_exception(exc)

    threading.Thread(target=target, name=f"caller-{next(_caller_ids)}", daemon=True).start()
    return future


class ArrivalClock:
    """``time.monotonic``, and a count of the calls queued by caller threads.

    ``run()`` reads the clock under its lock as it queues a call, so once ``wait_for(n)`` returns, ``n`` more calls
    are in the queue.
    """

    def __init__(self) -> None:
        self._arrivals = threading.Semaphore(0)

    def __call__(self) -> float:
        if threading.current_thread().name.startswith("caller-"):
            self._arrivals.release()
        return time.monotonic()

    def wait_for(self, n: int) -> None:
        for _ in range(n):
            assert self._arrivals.acquire(timeout=TIMEOUT_S), "a caller never reached the queue"


class Model:
    """``run(text, times=0, upper=False)``; ``run_batch`` records each batch's size and can hold the first batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batch_sizes: list[int] = []
        self.gate = gate
        self.first_batch_started = threading.Event()

    def run(self, text: str, times: int = 0, upper: bool = False) -> str:
        raise AssertionError("the batcher calls run_batch, never run")

    def run_batch(self, text: list[str], times: list[int], upper: list[bool]) -> list[Any]:
        self.batch_sizes.append(len(text))
        self.first_batch_started.set()
        if self.gate is not None and len(self.batch_sizes) == 1:
            assert self.gate.wait(TIMEOUT_S)
        return [self.expected(t, n, u) for t, n, u in zip(text, times, upper, strict=True)]

    @staticmethod
    def expected(text: str, times: int = 0, upper: bool = False) -> str:
        out = f"{text}x{times}"
        return out.upper() if upper else out


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., Batcher]]:
    """Build batchers that are stopped after the test, so no batch thread outlives it."""
    made: list[Batcher] = []

    def make(model: Any, batch_size: int, delay_s: float | None = None, **options: Any) -> Batcher:
        batcher = Batcher("model", model, batch_size, delay_s, **options)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.stop(timeout=TIMEOUT_S)


@dataclass
class HeldBatch:
    """A batcher whose first batch runs alone, held at ``gate``, with the ``queued`` calls waiting behind it."""

    gate: threading.Event
    model: Model
    batcher: Batcher
    first: Future[Any]
    queued: list[Future[Any]]


def hold_first_batch(
    make_batcher: Callable[..., Batcher], first: str, queued: list[str], *, batch_size: int, **kwargs: Any
) -> HeldBatch:
    """Start ``run(first)``, hold its batch at the gate, then queue ``run(text, **kwargs)`` for each queued text."""
    gate = threading.Event()
    model = Model(gate)
    clock = ArrivalClock()
    batcher = make_batcher(model, batch_size=batch_size, clock=clock)
    running = in_thread(batcher.run, first)
    assert model.first_batch_started.wait(TIMEOUT_S)
    waiting = [in_thread(batcher.run, text, **kwargs) for text in queued]
    clock.wait_for(1 + len(queued))
    return HeldBatch(gate, model, batcher, running, waiting)


# -- batching ----------------------------------------------------------------------------------------------------


def test_concurrent_callers_get_their_own_results_in_full_batches(make_batcher: Callable[..., Batcher]) -> None:
    model = Model()
    batcher = make_batcher(model, batch_size=4, delay_s=NEVER_S)

    futures = {i: in_thread(batcher.run, f"t{i}", times=i) for i in range(12)}

    assert {i: f.result(TIMEOUT_S) for i, f in futures.items()} == {i: f"t{i}x{i}" for i in range(12)}
    assert model.batch_sizes == [4, 4, 4]


def test_callers_queued_behind_a_running_batch_form_the_next_batches(make_batcher: Callable[..., Batcher]) -> None:
    held = hold_first_batch(make_batcher, "first", [f"q{i}" for i in range(6)], batch_size=4, upper=True)
    held.gate.set()

    assert held.first.result(TIMEOUT_S) == "firstx0"
    assert [f.result(TIMEOUT_S) for f in held.queued] == [f"Q{i}X0" for i in range(6)]
    assert held.model.batch_sizes == [1, 4, 2]


def test_a_partial_batch_runs_once_its_delay_has_passed(make_batcher: Callable[..., Batcher]) -> None:
    model = Model()
    batcher = make_batcher(model, batch_size=100, delay_s=0.01)

    assert in_thread(batcher.run, "alone").result(TIMEOUT_S) == "alonex0"
    assert model.batch_sizes == [1]


def test_positional_and_falsy_default_arguments(make_batcher: Callable[..., Batcher]) -> None:
    seen: list[dict[str, list[Any]]] = []

    class Recording(Model):
        def run_batch(self, **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            seen.append(lists)
            return super().run_batch(**lists)

    batcher = make_batcher(Recording(), batch_size=2, delay_s=NEVER_S)
    a = in_thread(batcher.run, "a")
    b = in_thread(batcher.run, "b", 3, True)

    assert (a.result(TIMEOUT_S), b.result(TIMEOUT_S)) == ("ax0", "BX3")
    assert sorted(zip(*seen[0].values(), strict=True)) == [("a", 0, False), ("b", 3, True)]


# -- failures ----------------------------------------------------------------------------------------------------


def test_a_call_missing_required_arguments_fails_alone(make_batcher: Callable[..., Batcher]) -> None:
    model = Model()
    batcher = make_batcher(model, batch_size=3, delay_s=NEVER_S)

    good = [in_thread(batcher.run, "a"), in_thread(batcher.run, "c", times=2)]
    bad = in_thread(batcher.run, times=1)

    with pytest.raises(MissingArgumentError, match="text"):
        bad.result(TIMEOUT_S)
    assert sorted(f.result(TIMEOUT_S) for f in good) == ["ax0", "cx2"]
    assert model.batch_sizes == [2]


def test_an_exception_from_run_batch_reaches_every_caller_with_its_type(make_batcher: Callable[..., Batcher]) -> None:
    class Broken(Model):
        def run_batch(self, **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            raise KeyError("weights missing")

    batcher = make_batcher(Broken(), batch_size=3, delay_s=NEVER_S)
    futures = [in_thread(batcher.run, f"t{i}") for i in range(3)]

    for future in futures:
        with pytest.raises(KeyError, match="weights missing"):
            future.result(TIMEOUT_S)


def test_an_exception_in_the_results_fails_only_its_caller(make_batcher: Callable[..., Batcher]) -> None:
    class Picky(Model):
        def run_batch(self, text: list[str], **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            return [ValueError(f"bad {t}") if t == "bad" else t for t in text]

    batcher = make_batcher(Picky(), batch_size=2, delay_s=NEVER_S)
    good, bad = in_thread(batcher.run, "good"), in_thread(batcher.run, "bad")

    assert good.result(TIMEOUT_S) == "good"
    with pytest.raises(ValueError, match="bad bad"):
        bad.result(TIMEOUT_S)


def test_a_wrong_number_of_results_fails_every_caller(make_batcher: Callable[..., Batcher]) -> None:
    class Short(Model):
        def run_batch(self, text: list[str], **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            return text[:-1]

    batcher = make_batcher(Short(), batch_size=3, delay_s=NEVER_S)
    futures = [in_thread(batcher.run, f"t{i}") for i in range(3)]

    for future in futures:
        with pytest.raises(BatchResultError, match="returned 2 results for a batch of 3"):
            future.result(TIMEOUT_S)


# The batch thread re-raises what killed it, so the thread-exception hook sees it: that is expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_model_that_kills_the_batch_thread_stops_the_batcher_instead_of_hanging_callers(
    make_batcher: Callable[..., Batcher],
) -> None:
    gate = threading.Event()

    class Exiting(Model):
        def run_batch(self, **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            self.first_batch_started.set()
            assert gate.wait(TIMEOUT_S)
            sys.exit(3)

    model = Exiting()
    clock = ArrivalClock()
    batcher = make_batcher(model, batch_size=1, clock=clock)
    first = in_thread(batcher.run, "first")
    assert model.first_batch_started.wait(TIMEOUT_S)
    queued = in_thread(batcher.run, "queued")
    clock.wait_for(2)
    gate.set()

    with pytest.raises(SystemExit):
        first.result(TIMEOUT_S)
    with pytest.raises(BatcherStopped):
        queued.result(TIMEOUT_S)
    with pytest.raises(BatcherStopped):
        batcher.run("later")


# -- stopping ----------------------------------------------------------------------------------------------------


def test_stop_fails_waiting_calls_and_lets_the_running_batch_finish(make_batcher: Callable[..., Batcher]) -> None:
    held = hold_first_batch(make_batcher, "running", [f"w{i}" for i in range(3)], batch_size=2)

    stopping = in_thread(held.batcher.stop)  # joins the batch thread, which is still held at the gate
    for future in held.queued:
        with pytest.raises(BatcherStopped) as info:
            future.result(TIMEOUT_S)
        assert isinstance(info.value, InterruptedError)
    assert not stopping.done()
    held.gate.set()

    assert held.first.result(TIMEOUT_S) == "runningx0"
    assert stopping.result(TIMEOUT_S) is None
    assert held.model.batch_sizes == [1]


def test_run_after_stop_raises_batcher_stopped(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(Model(), batch_size=2)
    assert in_thread(batcher.run, "before").result(TIMEOUT_S) == "beforex0"

    batcher.stop(timeout=TIMEOUT_S)

    with pytest.raises(BatcherStopped, match="stopped"):
        batcher.run("after")


def test_stop_before_any_call_then_run_raises(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(Model(), batch_size=2)
    batcher.stop()

    with pytest.raises(InterruptedError):
        batcher.run("never")


def test_stop_from_inside_run_batch_does_not_deadlock(make_batcher: Callable[..., Batcher]) -> None:
    class StopsItself(Model):
        batcher: Batcher

        def run_batch(self, **lists: list[Any]) -> list[Any]:  # type: ignore[override]
            self.batcher.stop()
            return super().run_batch(**lists)

    model = StopsItself()
    model.batcher = make_batcher(model, batch_size=2)

    assert in_thread(model.batcher.run, "last").result(TIMEOUT_S) == "lastx0"
    with pytest.raises(BatcherStopped):
        model.batcher.run("too late")


# -- stress ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay_s", [0.001, 0.005])
def test_bursts_and_gaps_around_the_delay_all_get_the_right_answer(
    make_batcher: Callable[..., Batcher], delay_s: float
) -> None:
    """12 threads x 250 calls with gaps of 0 (bursts) to twice the delay: every call answers, correctly, in time."""
    model = Model()
    batch_size = 8
    batcher = make_batcher(model, batch_size=batch_size, delay_s=delay_s)
    gaps = [0.0, 0.0, 0.0, delay_s / 2, delay_s, 2 * delay_s]

    def client(seed: int) -> int:
        rng = random.Random(seed)
        rejected = 0
        for i in range(250):
            if rng.random() < 0.05:
                try:
                    batcher.run(times=i)
                except MissingArgumentError:
                    rejected += 1
                    continue
                raise AssertionError("a call without 'text' was not rejected")
            text, times, upper = f"c{seed}-{i}", rng.choice([0, i]), rng.choice([False, True])
            assert batcher.run(text, times=times, upper=upper) == Model.expected(text, times, upper)
            time.sleep(rng.choice(gaps))
        return rejected

    started = time.monotonic()
    clients = [in_thread(client, seed) for seed in range(12)]
    rejected = sum(c.result(TIMEOUT_S * 2) for c in clients)

    assert time.monotonic() - started < 20
    assert sum(model.batch_sizes) == 12 * 250 - rejected
    assert max(model.batch_sizes) <= batch_size
    assert max(model.batch_sizes) > 1
