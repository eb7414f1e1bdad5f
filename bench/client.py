"""The load generator, run as a subprocess under each system's own interpreter: `python -m bench.client MODE
...`.

It imports the system's app module (which reads its settings from the environment, see `bench.config`) and
prints one JSON object on its last stdout line.

Latency is observed the same way for every system: one PSUBSCRIBE to `celery-task-meta-*` on the result
backend, opened before the first send. Every Celery result is a SET and a PUBLISH of the same payload, so the
arrival of the PUBLISH is the moment a blocked `AsyncResult.get()` would wake. Polling was rejected: its
interval would be added to every sample, and calling `.get()` per request needs a thread per in-flight request
to stay open-loop.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from typing import Any

import redis

from bench.config import AppSettings
from bench.stats import percentile

META_PREFIX = "celery-task-meta-"
#: How long the warm-up waits for the worker's first answer, in seconds (covers worker start-up).
WARMUP_TIMEOUT_S = 60.0
#: Requests sent one at a time before the open-loop phase, so imports and connections are warm on both sides.
WARMUP_REQUESTS = 5


class ResultListener:
    """Records when each task's result is published, keyed by task id, from a background thread."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe(META_PREFIX + "*")
        # Wait for the subscription to be confirmed: a result published before that would be missed.
        while (msg := self._pubsub.get_message(timeout=1.0)) is None or msg["type"] != "psubscribe":
            pass
        self.arrivals: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="result-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg is not None and msg["type"] == "pmessage":
                now = time.perf_counter()
                task_id = msg["channel"].decode()[len(META_PREFIX) :]
                self.arrivals.setdefault(task_id, now)

    def wait_for(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(i not in self.arrivals for i in ids):
            time.sleep(0.01)

    def stored_states(self, ids: list[str]) -> dict[str, int]:
        """Among `ids`, count results stored but never published, and absent ones (a client sees PENDING)."""
        metas = self._client.mget([META_PREFIX + i for i in ids]) if ids else []
        counts = {"stored_unpublished": 0, "pending": 0}
        for meta in metas:
            counts["pending" if meta is None else "stored_unpublished"] += 1
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._pubsub.close()
        self._client.close()


def submit(task: Any, n: int, *, bulk: bool) -> dict[str, Any]:
    """Send n requests as fast as one client can: a loop of `apply_async`, or one `submit_many` call."""
    start = time.perf_counter()
    if bulk:
        results = task.submit_many([{"x": i} for i in range(n)])
    else:
        results = [task.apply_async(kwargs={"x": i}) for i in range(n)]
    elapsed = time.perf_counter() - start
    return {"n": n, "elapsed_s": elapsed, "rate": n / elapsed, "ids": [r.id for r in results]}


def latency(task: Any, url: str, *, rate: float, duration_s: float, wait_s: float) -> dict[str, Any]:
    """Open loop: request i is due at t0 + i/rate whatever happened to earlier ones, for `duration_s` seconds.

    A sample is measured from the request's *scheduled* send time, so a client that falls behind is charged
    for it instead of hiding the backlog (coordinated omission).
    """
    listener = ResultListener(url)
    try:
        for i in range(WARMUP_REQUESTS):
            warm = task.apply_async(kwargs={"x": -1 - i})
            listener.wait_for([warm.id], WARMUP_TIMEOUT_S)
            if warm.id not in listener.arrivals:
                error = "warm-up result never published"
                return {"offered_rate": rate, "error": error, **listener.stored_states([warm.id])}
        sent: list[tuple[str, float]] = []
        start = time.perf_counter()
        count = int(rate * duration_s)
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent.append((task.apply_async(kwargs={"x": i}).id, due))
        send_s = time.perf_counter() - start
        listener.wait_for([task_id for task_id, _ in sent], wait_s)
        samples = [(listener.arrivals[t] - due) * 1000 for t, due in sent if t in listener.arrivals]
        missing = [t for t, _ in sent if t not in listener.arrivals]
        return {
            "offered_rate": rate,
            "achieved_send_rate": count / send_s if send_s > 0 else None,
            "sent": count,
            "received": len(samples),
            "p50_ms": percentile(samples, 0.50),
            "p99_ms": percentile(samples, 0.99),
            "max_ms": max(samples, default=None),
            "samples_ms": [round(s, 3) for s in samples],
            **listener.stored_states(missing),
        }
    finally:
        listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("mode", choices=("submit", "latency"))
    parser.add_argument("--system", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bulk", action="store_true", help="submit with submit_many when the task has it")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--wait", type=float, default=60.0, help="max seconds to wait for results after sending")
    args = parser.parse_args(argv)

    settings = AppSettings.from_env()
    task = importlib.import_module(f"bench.systems.{args.system}").predict
    import celery  # after the app module, which fails first with a clearer message

    out: dict[str, Any] = {"celery": celery.__version__, "has_bulk": hasattr(task, "submit_many")}
    if args.mode == "submit":
        if args.bulk and not out["has_bulk"]:
            out["error"] = "no submit_many on this task"
        else:
            out.update(submit(task, args.n, bulk=args.bulk))
    else:
        out.update(latency(task, settings.redis_url, rate=args.rate, duration_s=args.duration, wait_s=args.wait))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
