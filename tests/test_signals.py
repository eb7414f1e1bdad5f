"""Celery's task signals, STARTED and tracebacks for batched tasks, compared with a plain task in the same worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals

from batching import MissingArgumentError, batched
from batching.codec import Request
from batching.worker.request import TaskRequest
from batching.worker.results import ResultWriter
from tests.conftest import Worker, poll_until, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker("tests.apps.signalled", redis_url, tmp_path_factory.mktemp("signalled") / "worker.log",
               "--pool", "solo")
    w.ready()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def app(redis_url: str) -> Any:
    from tests.apps import signalled

    return signalled


def _log(rclient: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in rclient.lrange("signalled:log", 0, -1)]


def _signals_of(rclient: redis.Redis, task_id: str, count: int, worker: Worker) -> list[dict[str, Any]]:
    """The signals recorded for one task, once ``count`` of them have arrived (postrun follows the stored result)."""
    def fetch() -> list[dict[str, Any]] | None:
        found = [entry for entry in _log(rclient) if entry["id"] == task_id]
        return found if len(found) >= count else None

    return poll_until(fetch, 30, f"{count} signals of {task_id}", detail=worker.output)


def test_each_item_gets_the_signals_of_a_plain_task_in_the_same_order(app: Any, worker: Worker,
                                                                      rclient: redis.Redis) -> None:
    plain = app.add.delay(2, 3)
    good = app.double.apply_async(kwargs={"x": 4}, headers={"x_tag": "four"})
    bad = app.double.apply_async(kwargs={"x": -2}, headers={"x_tag": "minus-two"})
    assert (plain.get(timeout=30), good.get(timeout=30)) == (5, 8)
    with pytest.raises(ValueError, match="negative input -2"):
        bad.get(timeout=30)

    reference = [e["signal"] for e in _signals_of(rclient, plain.id, 4, worker)]
    assert reference == ["received", "prerun", "success", "postrun"]
    ok = _signals_of(rclient, good.id, 4, worker)
    assert [e["signal"] for e in ok] == reference
    # task.request is the item's own request around every signal: its id, its custom header (as an attribute and in
    # .headers), its queue.
    for entry in ok[1:]:
        assert (entry["request_id"], entry["tag"], entry["headers_tag"]) == (good.id, "four", "four")
        assert entry["queue"] == "batching.tests.apps.signalled.double"
    assert ok[0]["name"] == "tests.apps.signalled.double"
    assert ok[1]["kwargs"] == {"x": 4}
    assert ok[2]["result"] == 8
    assert (ok[3]["state"], ok[3]["retval"]) == ("SUCCESS", 8)

    failed = _signals_of(rclient, bad.id, 4, worker)
    assert [e["signal"] for e in failed] == ["received", "prerun", "failure", "postrun"]
    failure = failed[2]
    assert (failure["request_id"], failure["tag"]) == (bad.id, "minus-two")
    assert (failure["exc_type"], failure["exc"], failure["einfo_type"]) == ("ValueError", "negative input -2",
                                                                             "ValueError")
    assert "ValueError: negative input -2" in failure["einfo_traceback"]
    assert failed[3]["state"] == "FAILURE"
    # The receiver that raises was logged by Celery, and changed nothing above.
    assert "a receiver with a bug" in worker.output()


def test_a_retried_item_gets_retry_then_runs_again(app: Any, worker: Worker, rclient: redis.Redis) -> None:
    result = app.flaky.delay(x=7)
    assert result.get(timeout=30) == "ok:7"
    entries = _signals_of(rclient, result.id, 8, worker)
    assert [e["signal"] for e in entries] == ["received", "prerun", "retry", "postrun",
                                              "received", "prerun", "success", "postrun"]
    retry = entries[2]
    assert retry["request_id"] == result.id and "attempt 1 of 7" in retry["reason"]
    assert entries[3]["state"] == "RETRY"


def test_an_expired_item_gets_task_revoked_only(app: Any, worker: Worker, rclient: redis.Redis) -> None:
    result = app.double.apply_async(kwargs={"x": 1}, expires=datetime.now(UTC) - timedelta(seconds=5))
    wait_until(lambda: result.state == "REVOKED", 30, "the expired task to be REVOKED", detail=worker.output)
    (entry,) = _signals_of(rclient, result.id, 1, worker)
    assert (entry["signal"], entry["expired"], entry["terminated"]) == ("revoked", True, False)


def test_failed_items_store_a_readable_traceback(app: Any, worker: Worker) -> None:
    returned = app.double.delay(x=-5)
    raised = app.crash.delay(x=1)
    missing = app.app.send_task("tests.apps.signalled.double", kwargs={})
    stray = app.add.apply_async((1, 2), queue="batching.tests.apps.signalled.double")  # refused by the consumer
    for result in (returned, raised, missing, stray):
        wait_until(_in_state(result, "FAILURE"), 30, "the failure to be stored", detail=worker.output)
    assert returned.traceback.startswith("Traceback (most recent call last):")
    assert "run_batch returned this exception as the request's result" in returned.traceback
    assert returned.traceback.endswith("ValueError: negative input -5\n")
    assert "in crash" in raised.traceback and 'raise ModelError(f"model crashed' in raised.traceback
    assert raised.traceback.endswith("ModelError: model crashed on a batch of 1\n")
    assert isinstance(missing.result, MissingArgumentError)
    assert "MissingArgumentError: missing required argument(s): x" in missing.traceback
    assert "the batching consumer reported this error" in stray.traceback
    assert stray.traceback.endswith("was sent to the batch queue 'batching.tests.apps.signalled.double', which only "
                                    "serves 'tests.apps.signalled.double'\n")


def test_track_started_stores_started_for_the_running_batch(app: Any, worker: Worker, rclient: redis.Redis) -> None:
    results = [app.gated.delay(x=i) for i in range(3)]
    try:
        for r in results:
            wait_until(_in_state(r, "STARTED"), 30, "STARTED while the batch runs", detail=worker.output)
        info = results[0].info
        assert set(info) == {"pid", "hostname"} and info["hostname"] in worker.output()
    finally:
        rclient.rpush("signalled:gate", *(["open"] * 3))
    assert [r.get(timeout=30) for r in results] == [0, 1, 2]


def echo(x):
    return x


def _in_state(result: Any, state: str) -> Callable[[], bool]:
    return lambda: result.state == state


def test_track_started_follows_the_app_setting() -> None:
    app = Celery("started", set_as_current=False)
    app.conf.task_track_started = True
    assert batched(app, echo, name="started.echo").worker_settings().track_started is True
    assert batched(app, echo, name="started.off", track_started=False).worker_settings().track_started is False


def test_started_is_never_stored_over_a_final_state(redis_url: str) -> None:
    app = Celery("started", broker=redis_url, backend=redis_url, set_as_current=False)
    writer = ResultWriter(app.backend)
    ids = [f"started-{state}-{time.monotonic_ns()}" for state in ("SUCCESS", "REVOKED", "RETRY", "PENDING")]
    app.backend.store_result(ids[0], 42, "SUCCESS")
    app.backend.store_result(ids[1], None, "REVOKED")
    app.backend.store_result(ids[2], ValueError("again"), "RETRY")
    requests = [TaskRequest(Request(i, "started.echo", [], {"x": 1}, {"id": i}, {}), "w1@host", "q", False)
                for i in ids]
    writer.write_started(requests, "w1@host", 123)
    states = [app.AsyncResult(i).state for i in ids]
    assert states == ["SUCCESS", "REVOKED", "STARTED", "STARTED"]
    assert app.AsyncResult(ids[0]).result == 42
    assert app.AsyncResult(ids[3]).info == {"pid": 123, "hostname": "w1@host"}


def test_submit_many_sends_the_publish_signals_and_task_sent_events(redis_url: str, rclient: redis.Redis,
                                                                   tmp_path: Path) -> None:
    app = Celery("bulk", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.task_send_sent_event = True
    task = batched(app, echo, name="bulk.echo")
    seen: list[tuple[str, str, str]] = []

    def before(sender: Any = None, headers: Any = None, routing_key: Any = None, **_: Any) -> None:
        headers["traceparent"] = f"tp-{headers['id']}"  # what OpenTelemetry does: the message must carry it
        seen.append(("before", sender, routing_key))

    def after(sender: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append(("after", sender, headers["traceparent"]))

    with _EventCapture(app, rclient) as events:
        signals.before_task_publish.connect(before, weak=False)
        signals.after_task_publish.connect(after, weak=False)
        try:
            results = task.submit_many([{"x": "a"}, {"x": "b"}])
        finally:
            signals.before_task_publish.disconnect(before)
            signals.after_task_publish.disconnect(after)
        wait_until(lambda: len(events) >= 2, 10, "two task-sent events")
    ids = [r.id for r in results]
    # Every message is announced before it is built and reported once stored: all of a bulk send is stored at once.
    assert seen == [("before", "bulk.echo", "batching.bulk.echo"), ("before", "bulk.echo", "batching.bulk.echo"),
                    ("after", "bulk.echo", f"tp-{ids[0]}"), ("after", "bulk.echo", f"tp-{ids[1]}")]
    raws = rclient.lrange("batching.bulk.echo", 0, -1)
    assert sorted(json.loads(raw)["headers"]["traceparent"] for raw in raws) == sorted(f"tp-{i}" for i in ids)
    assert [(e["uuid"], e["name"], e["queue"]) for e in events] == [(i, "bulk.echo", "batching.bulk.echo")
                                                                   for i in ids]
    rclient.delete("batching.bulk.echo")


class _EventCapture:
    """Task events as a monitor receives them, through Celery's own ``EventReceiver`` in a thread."""

    def __init__(self, app: Celery, rclient: redis.Redis) -> None:
        self.events: list[dict[str, Any]] = []
        self.rclient = rclient
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"task-sent": self.events.append})
        self.thread = threading.Thread(target=self.receiver.capture, kwargs={"wakeup": False}, daemon=True)

    def __enter__(self) -> list[dict[str, Any]]:
        before = self.rclient.pubsub_numpat()
        self.thread.start()
        # Events are a Redis PUBLISH: only a receiver already subscribed gets them.
        wait_until(lambda: self.rclient.pubsub_numpat() > before, 10, "the event receiver to subscribe")
        return self.events

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.release()


def test_with_no_receivers_a_batch_carries_nothing_per_item() -> None:
    from batching.store.queue import Claim
    from batching.worker.batch import Batch, Item
    from batching.worker.signals import TaskSignals, listened

    assert not listened()  # the test apps connect their receivers in their workers only
    app = Celery("quiet", set_as_current=False)
    batched(app, echo, name="quiet.echo")
    requests = [TaskRequest(Request(f"q{i}", "quiet.echo", [], {"x": i}, {"id": f"q{i}"}, {}), "h", "q", False)
                for i in range(3)]
    batch = Batch(Claim("claim"), items=[Item(r) for r in requests])
    TaskSignals(app, "quiet.echo").prerun(batch)
    assert batch.observed is None


def test_einfo_of_a_returned_exception_reads_like_the_tracers() -> None:
    from batching.worker.signals import exception_info

    error = ValueError("returned, never raised")
    einfo = exception_info(error)
    assert (einfo.type, einfo.exception.exc, einfo.tb) == (ValueError, error, None)
    assert einfo.traceback.startswith("Traceback (most recent call last):\n")
    assert str(einfo).endswith("ValueError: returned, never raised\n")
    try:
        raise KeyError("raised")
    except KeyError as exc:
        raised = exception_info(exc)
    assert raised.exception.exc.args == ("raised",) and "raise KeyError" in raised.traceback
