"""Synthetic models with the same batch semantics for every system: a list of inputs in, one output per input
out.

Plain Celery calls them with a batch of one; the batchers call them with whatever batch they formed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

Model = Callable[[Sequence[Any]], list[Any]]

#: Fixed cost of one `accel` call, in seconds (kernel launch + transfer, as a GPU looks from the host).
ACCEL_FIXED_S = 0.005
#: Extra cost of one item in an `accel` call, in seconds.
ACCEL_PER_ITEM_S = 0.00005


def noop(xs: Sequence[Any]) -> list[Any]:
    """Return the inputs: what is left to measure is the framework's own overhead."""
    return list(xs)


def accel(xs: Sequence[Any]) -> list[Any]:
    """Cost 5 ms + 0.05 ms per item, spent sleeping: the CPU stays free for the framework, as with a GPU."""
    time.sleep(ACCEL_FIXED_S + ACCEL_PER_ITEM_S * len(xs))
    return list(xs)


MODELS: dict[str, Model] = {"noop": noop, "accel": accel}


def get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
