"""Which claimed requests make up the next batch of a task with ``cost=``: pure choices, time passed in.

- In claim order (the default): the oldest requests, as many as fit ``batch_size`` and ``max_batch_cost``; the
  first that does not fit ends the batch, so order is kept as far as the budget allows (TEI's FIFO filling).
- Bucketed (``bucket=True``): from a window of the oldest claimed requests, every request held ``max_delay`` or
  longer goes first (oldest first); when none is, the oldest anchors the batch. The rest of the batch is filled
  with the requests closest in cost to those, so a batch of short texts is not padded to one long text. A request
  is never held back longer than ``max_delay`` plus the batch in front of it: nothing starves.

Whatever is not chosen stays claimed for the next batch (``fetch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..cost import CostSpec

#: How many batches' worth of the oldest requests a bucketing consumer holds to choose from.
BUCKET_WINDOW = 4


@dataclass(frozen=True, slots=True)
class Pick:
    """The chosen requests (indices, oldest first), whether the batch is full (by count, or by the budget), and
    whether the budget ended it."""

    chosen: list[int]
    full: bool
    by_cost: bool


def in_order(costs: Sequence[float], spec: CostSpec, batch_size: int) -> Pick:
    """The longest prefix of ``costs`` that fits the count and the budget."""
    tally = spec.tally()
    for i, cost in enumerate(costs):
        if i >= batch_size:
            return Pick(list(range(i)), True, False)
        if not tally.fits(cost):
            # Never the first: a single request over the budget was refused at submit or failed at decode.
            return Pick(list(range(i)), True, True)
        tally.add(cost)
    return Pick(list(range(len(costs))), len(costs) >= batch_size, False)


def bucketed(
    costs: Sequence[float], seen_at: Sequence[float], now: float, spec: CostSpec, batch_size: int,
    max_delay_s: float,
) -> Pick:
    """Requests due (held ``max_delay_s`` or more) first, then the closest in cost to them; ``costs`` and
    ``seen_at`` are in claim order, oldest first."""
    if not costs:
        return Pick([], False, False)
    tally = spec.tally()
    chosen: list[int] = []
    by_cost = False
    due = [i for i, seen in enumerate(seen_at) if now - seen >= max_delay_s] or [0]
    for i in due:
        if len(chosen) >= batch_size:
            break
        if tally.fits(costs[i]):
            tally.add(costs[i])
            chosen.append(i)
        else:
            by_cost = True
            break  # the due requests go oldest first, as far as the budget allows
    low = min(costs[i] for i in chosen)
    high = max(costs[i] for i in chosen)
    taken = set(chosen)
    rest = sorted((i for i in range(len(costs)) if i not in taken),
                  key=lambda i: (max(low - costs[i], costs[i] - high, 0.0), i))
    for i in rest:
        if len(chosen) >= batch_size:
            break
        if tally.fits(costs[i]):
            tally.add(costs[i])
            chosen.append(i)
    chosen.sort()
    if len(chosen) >= batch_size:
        return Pick(chosen, True, False)
    # Full by cost only once not even the cheapest request would fit: one that is merely unlike the batch (a long
    # text among short ones) waits for the next batch, while this one waits for more of its kind, up to max_delay.
    by_cost = by_cost or not tally.fits(min(costs))
    return Pick(chosen, by_cost, by_cost)
