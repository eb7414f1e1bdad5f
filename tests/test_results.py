"""Result metas as the consumer writes them: the same bytes as the backend's own encoding, and array results
(numpy, torch) stored without Python-level encoding per float, read back by clients through ``AsyncResult.get()``."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from celery import Celery

from batching.codec import Request
from batching.errors import ResultEncodeError
from batching.worker.batch import Outcome
from batching.worker.request import TaskRequest
from batching.worker.results import ResultWriter

DATE = "2026-12-03T09:30:00.123456+00:00"


def app_for(redis_url: str, serializer: str = "json") -> Celery:
    app = Celery("results", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.result_serializer = serializer
    app.conf.accept_content = ["json", serializer]
    app.conf.result_accept_content = ["json", serializer]
    return app


def request(task_id: str, **headers: Any) -> TaskRequest:
    return TaskRequest(Request(task_id, "results.echo", [], {}, {"id": task_id, **headers}, {}), "w@h", "q", False)


def stored(app: Celery, values: list[Any]) -> list[Any]:
    """Write each value as a SUCCESS and read it back as a client does."""
    ids = [uuid.uuid4().hex for _ in values]
    writer = ResultWriter(app.backend)
    assert writer.write([Outcome.of(i, v, request(i)) for i, v in zip(ids, values, strict=True)])
    return [app.AsyncResult(i).get(timeout=5) for i in ids]


PLAIN_VALUES = [0, -7, 2**70, 1.5, math.nan, "héllo \"quoted\" \u2028", None, True, [1, [2, {"a": [3, 4]}]],
                {"k": [1.0, 2.5]}, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), b"bytes", (1, "two")]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
def test_a_plain_success_meta_is_byte_for_byte_what_the_backend_encodes(redis_url: str, value: Any) -> None:
    writer = ResultWriter(app_for(redis_url).backend)
    outcome = Outcome.of("id-1", value, request("id-1"))

    fast = writer._success_json(outcome, DATE)

    assert fast is not None and fast == writer._meta(outcome, DATE)


def test_metas_with_children_group_or_parent_are_left_to_the_backend(redis_url: str) -> None:
    writer = ResultWriter(app_for(redis_url).backend)
    assert writer._success_json(Outcome.of("id-2", 1, request("id-2", group="g1")), DATE) is None
    assert writer._success_json(Outcome.of("id-3", 1, request("id-3", parent_id="p1")), DATE) is None
    with_child = request("id-4")
    with_child.children.append(Celery(set_as_current=False).AsyncResult("child"))
    assert writer._success_json(Outcome.of("id-4", 1, with_child), DATE) is None


def test_plain_values_come_back_as_before(redis_url: str) -> None:
    values = [v for v in PLAIN_VALUES if not (isinstance(v, float) and math.isnan(v))]
    got = stored(app_for(redis_url), values)
    assert got == [list(v) if isinstance(v, tuple) else v for v in values]
    assert math.isnan(stored(app_for(redis_url), [math.nan])[0])


def as_client_gets_it(value: Any) -> Any:
    """What a client got when the model called ``tolist()`` itself: the values json.dumps wrote of that."""
    if isinstance(value, (list, tuple)):
        return [as_client_gets_it(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def arrays() -> list[Any]:
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((3, 384)).astype(np.float32)
    return [
        *matrix,  # the rows of a batch's float32 array: what split() hands over
        matrix[0] * np.float32(1e-30),  # tiny float32 values, whose float32 and float64 shortest forms differ
        np.arange(5, dtype=np.int64), np.array([True, False]), np.float32(0.1), np.int16(-3), np.array(2.5),
        np.array([1.0, np.nan, np.inf]),  # orjson would write null: the standard encoder writes NaN
        np.array([1 + 2j]).real, matrix[:, 0],  # a non-contiguous view
        [np.array([0.1, 0.2], dtype=np.float32), np.array([3], dtype=np.uint8)],  # a list of arrays
        np.array(["a", "b"]),  # strings: tolist(), then the standard encoder
    ]


def test_array_results_reach_json_clients_with_the_values_tolist_gave(redis_url: str) -> None:
    values = arrays()

    got = stored(app_for(redis_url), values)

    for value, received in zip(values, got, strict=True):
        want = as_client_gets_it(value)
        if isinstance(want, list) and any(isinstance(x, float) and math.isnan(x) for x in want):
            assert math.isnan(received[1]) and received[0] == 1.0 and received[2] == math.inf
            continue
        assert received == want
        assert type(received) is type(want)


def test_array_results_are_encoded_without_tolist(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is the one taken for a float32 row: tolist() (a float at a time in Python) is never called."""
    writer = ResultWriter(app_for(redis_url).backend)
    row = np.linspace(0, 1, 384, dtype=np.float32)
    calls: list[Any] = []

    def plain(value: Any) -> Any:
        calls.append(value)
        return value

    monkeypatch.setattr("batching.worker.results.plain", plain)
    payload = writer._encode(Outcome.of("id-5", row, request("id-5")), DATE)
    assert calls == []
    assert '"status": "SUCCESS"' in payload and "0.0026" in payload


def test_torch_tensors_are_stored_as_lists_of_floats(redis_url: str) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.linspace(0, 1, 7, dtype=torch.float32, requires_grad=True) * 3
    got = stored(app_for(redis_url), [tensor, [tensor[:2], tensor[2:]]])
    assert got == [tensor.detach().tolist(), [tensor[:2].tolist(), tensor[2:].tolist()]]


def test_pickle_clients_get_the_arrays_themselves(redis_url: str) -> None:
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)

    got = stored(app_for(redis_url, "pickle"), [*matrix, np.float32(0.5)])

    assert all(type(g) is type(v) for g, v in zip(got, [*matrix, np.float32(0.5)], strict=True))
    assert np.array_equal(got[0], matrix[0]) and got[0].dtype == np.float32 and got[2] == np.float32(0.5)


def test_other_serializers_get_the_values_tolist_gives(redis_url: str) -> None:
    values = [*arrays()[:4], np.float32(0.1), [np.array([1, 2]), np.array([3])]]

    got = stored(app_for(redis_url, "yaml"), values)

    assert got == [as_client_gets_it(v) for v in values]


def test_a_result_no_serializer_can_store_fails_alone_with_a_clear_error(redis_url: str) -> None:
    app = app_for(redis_url)
    ids = [uuid.uuid4().hex for _ in range(2)]
    ResultWriter(app.backend).write([Outcome.of(ids[0], np.array([object()]), request(ids[0])),
                                     Outcome.of(ids[1], np.ones(2), request(ids[1]))])
    with pytest.raises(ResultEncodeError, match="json"):
        app.AsyncResult(ids[0]).get(timeout=5)
    assert app.AsyncResult(ids[1]).get(timeout=5) == [1.0, 1.0]


def test_each_result_gets_its_lifetime_and_its_own_key(redis_url: str, rclient: Any) -> None:
    app = app_for(redis_url)
    app.conf.result_expires = 600
    writer = ResultWriter(app.backend)
    ids = [uuid.uuid4().hex for _ in range(6)]
    values: list[Any] = [1, ValueError("a"), 3, ValueError("b"), 5, 6]
    outcomes = [Outcome.of(i, v, request(i)) for i, v in zip(ids, values, strict=True)]

    assert writer.write(outcomes)
    assert [rclient.ttl(f"celery-task-meta-{i}") for i in ids] == pytest.approx([600] * 6, abs=2)

    app.backend.failure_expires = 60  # a backend that keeps failures for less time
    assert writer.write(outcomes)
    ttls = [rclient.ttl(f"celery-task-meta-{i}") for i in ids]
    assert ttls == pytest.approx([600, 60, 600, 60, 600, 600], abs=2)
    got = [app.AsyncResult(i).get(timeout=5, propagate=False) for i in ids]
    assert [g if not isinstance(g, Exception) else str(g) for g in got] == [1, "a", 3, "b", 5, 6]


def test_results_are_stored_under_the_backend_s_own_keys(redis_url: str) -> None:
    app = app_for(redis_url)
    app.conf.result_backend_transport_options = {"global_keyprefix": "tenant1:"}
    writer = ResultWriter(app.backend)
    task_id = uuid.uuid4().hex

    expected = f"tenant1:celery-task-meta-{task_id}".encode()
    assert writer._key(task_id) == app.backend.get_key_for_task(task_id) == expected
    assert writer.write([Outcome.of(task_id, "v", request(task_id))])
    assert app.AsyncResult(task_id).get(timeout=5) == "v"
