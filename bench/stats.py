"""Pure arithmetic on measurements (no I/O), shared by the harness and the clients."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

#: Stamps closer than this to the first one count as "finished at the same instant", in seconds.
SAME_INSTANT_S = 0.0005


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): stable p99 from a few hundred samples."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the runs that produced a number; None when none did."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def drain_stats(metas: Sequence[bytes | None]) -> dict[str, Any]:
    """Throughput from the results' own `date_done` stamps: (done - n_first) / (last - first).

    n_first counts the results stamped at the first instant (within `SAME_INSTANT_S`): they were computed
    before the measured interval began. It is 1 for plain Celery and for celery-batches (which stores results
    one at a time), but a whole batch for a batcher that stamps a batch once; the plain (done - 1) would credit
    that batch to the interval and overstate a short run by up to one batch / N (+45% at N=200, batch 64).

    Using the backend's stamps rather than the harness's clock leaves out worker start-up (the worker was
    started after the queue was filled) and the harness's polling interval.
    """
    states: Counter[str] = Counter()
    stamps: list[float] = []
    for raw in metas:
        if raw is None:
            states["PENDING"] += 1  # what a client would see: no meta stored at all
            continue
        meta = json.loads(raw)
        states[meta.get("status", "?")] += 1
        if meta.get("date_done"):
            stamps.append(datetime.fromisoformat(meta["date_done"]).timestamp())
    stamps.sort()
    span = stamps[-1] - stamps[0] if len(stamps) >= 2 else 0.0
    n_first = sum(1 for t in stamps if t - stamps[0] <= SAME_INSTANT_S)
    return {
        "rate": (len(stamps) - n_first) / span if span > 0 else None,
        "n_first": n_first,
        "done": len(stamps),
        "span_s": span,
        "states": dict(states),
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs; None with fewer than two distinct xs."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx


def overlap_rate(stamps_by_worker: dict[str, list[float]]) -> dict[str, Any]:
    """Completions per second while *every* worker was producing results: between the latest first stamp and the
    earliest last stamp. It leaves out the start-up skew (one worker booted before the other) and the tail (one
    worker finished its last batch while the other was still on its own)."""
    if len(stamps_by_worker) < 2 or any(not s for s in stamps_by_worker.values()):
        return {"rate": None, "span_s": 0.0, "done": 0}
    start = max(min(s) for s in stamps_by_worker.values())
    end = min(max(s) for s in stamps_by_worker.values())
    # Results stamped at `start` itself were computed before the window opened (see `drain_stats`).
    done = sum(1 for s in stamps_by_worker.values() for t in s if start + SAME_INSTANT_S < t <= end)
    span = end - start
    return {"rate": done / span if span > 0 else None, "span_s": span, "done": done}
