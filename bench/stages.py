"""`python -m bench.stages`: where a task's time goes in one consumer, stage by stage, in µs per task.

The consumer's three threads share one GIL, so a profile of the running worker mixes their stages. Here the same
stages run one after another on one thread, in-process, against a private redis-server: a pre-filled queue of
no-op requests (`x=i`, the benchmark's no-op model) is claimed, triaged, run, encoded, stored and finished batch
by batch through the consumer's own objects, each stage timed with `perf_counter_ns`. Redis's own work inside a
round trip counts in the stage that waits for it. Medians over `--runs` drains are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery.worker import state as worker_state

from batching import batched
from batching.redis_server import private_redis
from batching.worker import runner as runner_module
from batching.worker.batch import Batch
from batching.worker.consumer import BatchConsumer
from batching.worker.triage import triage

#: (stage, what it covers), in data-path order.
STAGES = (
    ("claim", "claim.lua round trip, replies parsed"),
    ("triage", "decode envelopes and bodies, sort, build requests"),
    ("merge_run_split", "bind and merge arguments, run_batch (no-op), split results"),
    ("outcomes", "time limits, an outcome per item"),
    ("encode", "result metas built and serialized"),
    ("store", "results.lua round trip (SET + PUBLISH per task)"),
    ("settle_rest", "ownership check, canvas, events, metrics"),
    ("finish", "ack.lua round trip"),
)


class _Clock:
    """Wall and CPU time (of this thread) per stage, in ns."""

    def __init__(self) -> None:
        self.wall: dict[str, int] = defaultdict(int)
        self.cpu: dict[str, int] = defaultdict(int)

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.stage(stage):
                return fn(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            yield
        finally:
            self.wall[stage] += time.perf_counter_ns() - wall
            self.cpu[stage] += time.thread_time_ns() - cpu


def drain_once(url: str, n: int, batch_size: int) -> dict[str, dict[str, float]]:
    """µs per task of each stage over one drain of `n` requests: {"wall": {stage: µs}, "cpu": {stage: µs}}."""
    app = Celery("bench-stages", broker=url, backend=url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True

    @batched(app, batch_size=batch_size, name="bench.stages.predict")
    def predict(x: list[Any]) -> list[Any]:
        return list(x)

    app.backend.client.flushall()
    predict.submit_many([{"x": i} for i in range(n)])
    consumer = BatchConsumer.for_task(predict)
    store = consumer.connect()
    keeper = consumer._require_keeper()
    clock = _Clock()
    # Nested stages are subtracted from their callers below.
    original_execute = runner_module.execute
    runner_module.execute = clock.timed("merge_run_split", runner_module.execute)  # type: ignore[assignment]
    writer = keeper.writer
    # Encoding is timed in a pass of its own over the batch's outcomes (then subtracted from the write that
    # repeats it): a timer around each task's encoding would cost more than some of what it measures.
    writer.write = clock.timed("write", writer.write)  # type: ignore[method-assign]
    store.finish = clock.timed("finish", store.finish)  # type: ignore[method-assign]
    done = 0
    try:
        while done < n:
            batch = Batch(store.new_claim())
            with clock.stage("claim"):
                store.claim(batch.claim, batch_size)
            with clock.stage("triage"):
                triage(batch, batch.claim.raws, consumer.rules, worker_state.revoked, store.now())
            with clock.stage("run"):
                consumer.runner.run(batch)
            settled = consumer._done.get_nowait()
            date_done = app.now().isoformat()
            with clock.stage("encode"):
                for outcome in settled.outcomes():
                    writer._encode(outcome, date_done)
            with clock.stage("settle"):
                keeper.settle(settled)
            done += len(batch.claim)
    finally:
        runner_module.execute = original_execute  # type: ignore[assignment]
        consumer.stop(timeout=0)
    out: dict[str, dict[str, float]] = {}
    for kind, totals in (("wall", clock.wall), ("cpu", clock.cpu)):
        totals["outcomes"] = totals["run"] - totals["merge_run_split"]
        totals["store"] = totals["write"] - totals["encode"]
        totals["settle_rest"] = totals["settle"] - totals["write"] - totals["finish"]
        stages = {stage: totals[stage] / 1000 / n for stage, _ in STAGES}
        stages["total"] = sum(stages.values())
        out[kind] = stages
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="requests per drain (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="drains; medians are printed (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args(argv)
    with private_redis() as url:
        runs = [drain_once(url, args.n, args.batch_size) for _ in range(args.runs)]
    medians = {kind: {stage: statistics.median(r[kind][stage] for r in runs) for stage in runs[0][kind]}
               for kind in ("wall", "cpu")}
    if args.json:
        print(json.dumps(medians))
        return 0
    print(f"µs per task, median of {args.runs} drains of {args.n:,} no-op requests, batch {args.batch_size}, "
          "one thread (wall: including the wait for Redis; cpu: this process's own work):")
    print(f"  {'stage':<16} {'wall':>6} {'cpu':>6}")
    for stage, what in [*STAGES, ("total", "")]:
        print(f"  {stage:<16} {medians['wall'][stage]:6.1f} {medians['cpu'][stage]:6.1f}   {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
