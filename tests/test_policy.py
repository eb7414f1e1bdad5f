"""When a forming batch runs: full, or its oldest request has waited ``max_delay_s``. Time is passed in."""

from __future__ import annotations

from typing import Any

import pytest

from batching.errors import ConfigurationError
from batching.policy import COUNT, EMPTY, FLUSH_REASONS, MAX_DELAY, FlushPolicy

T0 = 1_000.0


def test_a_full_batch_runs_now() -> None:
    policy = FlushPolicy(batch_size=4, max_delay_s=10.0)

    assert policy.wait_s(now=T0, oldest=T0, count=4) is None
    assert policy.wait_s(now=T0, oldest=T0, count=5) is None


def test_an_empty_batch_waits_for_its_first_request() -> None:
    assert FlushPolicy(batch_size=4, max_delay_s=0.5).wait_s(now=T0, oldest=None, count=0) == float("inf")


def test_a_partial_batch_waits_until_its_oldest_request_is_max_delay_old() -> None:
    policy = FlushPolicy(batch_size=4, max_delay_s=0.5)

    assert policy.wait_s(now=T0, oldest=T0, count=1) == pytest.approx(0.5)
    assert policy.wait_s(now=T0 + 0.2, oldest=T0, count=2) == pytest.approx(0.3)
    assert policy.wait_s(now=T0 + 0.5, oldest=T0, count=2) is None
    assert policy.wait_s(now=T0 + 7.0, oldest=T0, count=2) is None


def test_a_trickle_of_arrivals_does_not_extend_the_wait() -> None:
    """A request every 0.4 s with max_delay 0.5 s: the batch runs 0.5 s after the first, not 0.5 s after the last."""
    policy = FlushPolicy(batch_size=10, max_delay_s=0.5)
    first = T0
    deadlines = []
    for count, arrival in enumerate([first, first + 0.4, first + 0.8], start=1):
        wait = policy.wait_s(now=arrival, oldest=first, count=count)
        deadlines.append(None if wait is None else arrival + wait)

    assert deadlines[0] == pytest.approx(first + 0.5)
    assert deadlines[1] == pytest.approx(first + 0.5)
    assert deadlines[2] is None  # already overdue when the third request arrives: run it now


def test_max_delay_zero_never_waits() -> None:
    policy = FlushPolicy(batch_size=8)

    assert policy.max_delay_s == 0.0
    assert policy.wait_s(now=T0, oldest=T0, count=1) is None
    assert policy.wait_s(now=T0, oldest=T0 - 1.0, count=7) is None


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, "4", None, True])
def test_batch_size_must_be_a_positive_integer(batch_size: Any) -> None:
    with pytest.raises(ConfigurationError, match="batch_size must be an integer >= 1"):
        FlushPolicy(batch_size=batch_size)


@pytest.mark.parametrize("max_delay_s", [-0.001, 3600, float("inf"), float("nan"), "0.1", None])
def test_max_delay_must_be_seconds_in_range(max_delay_s: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"max_delay must be a number of seconds in \[0, 3600\)"):
        FlushPolicy(batch_size=2, max_delay_s=max_delay_s)


def test_valid_settings_are_kept() -> None:
    policy = FlushPolicy(batch_size=1, max_delay_s=0.25)

    assert (policy.batch_size, policy.max_delay_s) == (1, 0.25)
    assert policy.wait_s(now=T0, oldest=T0, count=1) is None  # a batch of one is always full


def test_the_flush_reason_says_full_or_why_the_wait_ended() -> None:
    assert FlushPolicy(4, 0.05).reason(4) == COUNT
    assert FlushPolicy(4, 0.05).reason(3) == MAX_DELAY
    assert FlushPolicy(4, 0.0).reason(3) == EMPTY  # greedy: it ran what the queue had
    assert FlushPolicy(4, 0.0).reason(4) == COUNT
    assert set(FLUSH_REASONS) == {"count", "cost", "max_delay", "empty", "shutdown"}  # names users see: a contract
