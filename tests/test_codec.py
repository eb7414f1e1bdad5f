"""Decoding queue elements: real Celery messages, published through kombu, exactly as the Redis transport stores them.

Messages are published by Celery to kombu's in-memory transport and taken back off its queue: that transport shares
the virtual-channel publish path with the Redis transport (``prepare_message``, then ``basic_publish`` base64-encodes
the body and sets ``properties.body_encoding``), whose ``_put`` then LPUSHes ``kombu.utils.json.dumps(message)``.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery
from kombu.serialization import prepare_accept_content
from kombu.utils.json import dumps

from batching.codec import Request, Undecodable, decode
from batching.errors import ContentDisallowed, MessageError

JSON_ONLY = prepare_accept_content(["json"])
JSON_AND_PICKLE = prepare_accept_content(["json", "pickle"])
TASK = "shop.predict"


def publish(protocol: int = 2, **options: Any) -> tuple[bytes, str]:
    """Send ``TASK`` through Celery and return (the bytes the Redis transport would store, the task id)."""
    app = Celery("codec-test", broker="memory://", set_as_current=False)
    app.conf.task_protocol = protocol
    queue = f"codec-test-{uuid.uuid4()}"  # the memory transport's queues are shared by every connection
    with app.connection_for_write() as connection:
        result = app.send_task(TASK, queue=queue, connection=connection, **options)
        message = connection.default_channel._get(queue)
    return dumps(message).encode(), result.id


def tampered(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The same stored message, with its JSON envelope changed in place by ``change``."""
    envelope = json.loads(raw)
    change(envelope)
    return json.dumps(envelope).encode()


def with_body(raw: bytes, body: bytes) -> bytes:
    """The same stored message carrying another (already serialized) body."""

    def change(envelope: dict[str, Any]) -> None:
        envelope["body"] = base64.b64encode(body).decode()

    return tampered(raw, change)


def undecodable(raw: bytes, accept: Any = JSON_ONLY) -> Undecodable:
    item = decode(raw, accept)
    assert isinstance(item, Undecodable), f"decoded what should have been rejected: {item!r}"
    assert isinstance(item.error, MessageError)
    return item


# -- good messages -----------------------------------------------------------------------------------------------


def test_protocol_2_message_decodes_to_its_arguments() -> None:
    raw, task_id = publish(args=[1, "x"], kwargs={"scale": 2.0, "tags": ["a"]})

    request = decode(raw, JSON_ONLY)

    assert isinstance(request, Request)
    assert (request.id, request.task) == (task_id, TASK)
    assert (request.args, request.kwargs) == ([1, "x"], {"scale": 2.0, "tags": ["a"]})
    assert request.headers["root_id"] == task_id
    assert (request.eta, request.expires) == (None, None)


def test_eta_and_expires_become_unix_seconds() -> None:
    eta, expires = datetime(2030, 1, 1, 12, tzinfo=UTC), datetime(2030, 1, 2, 12, tzinfo=UTC)
    raw, _ = publish(args=[1], eta=eta, expires=expires)

    request = decode(raw, JSON_ONLY)

    assert isinstance(request, Request)
    assert request.eta == eta.timestamp()
    assert request.expires == expires.timestamp()


def test_naive_eta_is_read_as_utc() -> None:
    raw, _ = publish(args=[1])

    def naive_eta(envelope: dict[str, Any]) -> None:
        envelope["headers"]["eta"] = "2030-01-01T00:00:00"

    request = decode(tampered(raw, naive_eta), JSON_ONLY)

    assert isinstance(request, Request)
    assert request.eta == datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def test_protocol_1_body_dict_decodes_to_the_same_request() -> None:
    eta = datetime(2030, 1, 1, tzinfo=UTC)
    raw, task_id = publish(protocol=1, args=[1, "x"], kwargs={"scale": 2.0}, eta=eta)
    assert json.loads(raw)["headers"] == {}  # protocol 1 really keeps everything in the body

    request = decode(raw, JSON_ONLY)

    assert isinstance(request, Request)
    assert (request.id, request.task, request.args, request.kwargs) == (task_id, TASK, [1, "x"], {"scale": 2.0})
    assert request.eta == eta.timestamp()


def test_zlib_compressed_body_is_decompressed() -> None:
    raw, task_id = publish(args=["x" * 1000], compression="zlib")
    assert json.loads(raw)["headers"]["compression"] == "application/x-gzip"

    request = decode(raw, JSON_ONLY)

    assert isinstance(request, Request)
    assert (request.id, request.args) == (task_id, ["x" * 1000])


def test_pickle_decodes_when_the_app_accepts_pickle() -> None:
    raw, task_id = publish(args=[{1, 2}], serializer="pickle")

    request = decode(raw, JSON_AND_PICKLE)

    assert isinstance(request, Request)
    assert (request.id, request.args) == (task_id, [{1, 2}])


# -- bad messages: always Undecodable, with a readable reason and the task id when the headers had one -----------


def test_not_json() -> None:
    item = undecodable(b"\x00 this is not json")

    assert "JSONDecodeError" in str(item.error)
    assert item.task_id is None


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_not_an_object(raw: bytes) -> None:
    item = undecodable(raw)

    assert "not a kombu message envelope" in str(item.error)
    assert item.task_id is None


def test_no_body_keeps_the_task_id_from_the_headers() -> None:
    raw, task_id = publish(args=[1])

    item = undecodable(tampered(raw, lambda envelope: envelope.pop("body")))

    assert "not a kombu message envelope (a JSON object with a 'body')" in str(item.error)
    assert (item.task_id, item.task) == (task_id, TASK)


def test_headers_not_an_object() -> None:
    raw, _ = publish(args=[1])

    def change(envelope: dict[str, Any]) -> None:
        envelope["headers"] = ["id", "task"]

    assert "headers must be an object, got list" in str(undecodable(tampered(raw, change)).error)


def test_bad_base64() -> None:
    raw, task_id = publish(args=[1])

    def change(envelope: dict[str, Any]) -> None:
        envelope["body"] = "%%% not base64 %%%"

    item = undecodable(tampered(raw, change))

    assert "body is not valid base64" in str(item.error)
    assert item.task_id == task_id


def test_base64_body_that_is_not_a_string() -> None:
    raw, task_id = publish(args=[1])

    def change(envelope: dict[str, Any]) -> None:
        envelope["body"] = [1, 2]

    item = undecodable(tampered(raw, change))

    assert "declared base64 but is not a string" in str(item.error)
    assert item.task_id == task_id


def test_body_that_does_not_deserialize() -> None:
    raw, task_id = publish(args=[1])

    item = undecodable(with_body(raw, b"\xff[1, {"))

    assert "cannot deserialize 'application/json' body" in str(item.error)
    assert item.task_id == task_id


def test_compressed_body_that_does_not_decompress() -> None:
    raw, task_id = publish(args=[1], compression="zlib")

    item = undecodable(with_body(raw, b"not zlib data"))

    assert "cannot decompress body (application/x-gzip)" in str(item.error)
    assert item.task_id == task_id


def test_missing_content_type() -> None:
    raw, task_id = publish(args=[1])

    item = undecodable(tampered(raw, lambda envelope: envelope.pop("content-type")))

    assert "no content-type" in str(item.error)
    assert item.task_id == task_id


def test_unknown_content_type_is_not_accepted() -> None:
    raw, task_id = publish(args=[1])

    def change(envelope: dict[str, Any]) -> None:
        envelope["content-type"] = "application/x-unheard-of"

    item = undecodable(tampered(raw, change))

    assert isinstance(item.error, ContentDisallowed)
    assert "'application/x-unheard-of' is not accepted by this app" in str(item.error)
    assert item.task_id == task_id


class _Detonator:
    """Unpickling this calls ``_record_unpickle``: the way to prove a pickle was never loaded."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _record_unpickle, ()


_unpickled: list[bool] = []


def _record_unpickle() -> str:
    _unpickled.append(True)
    return "loaded"


def test_pickle_is_refused_and_never_loaded_when_the_app_accepts_only_json() -> None:
    raw, task_id = publish(args=[1], serializer="pickle")
    raw = with_body(raw, pickle.dumps(((_Detonator(),), {}, {})))
    _unpickled.clear()

    item = undecodable(raw, JSON_ONLY)

    assert isinstance(item.error, ContentDisallowed)
    assert "'application/x-python-serialize' is not accepted" in str(item.error)
    assert item.task_id == task_id
    assert _unpickled == []
    # The same message does load its pickle where pickle is accepted: the detector works.
    assert isinstance(decode(raw, JSON_AND_PICKLE), Request)
    assert _unpickled == [True]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([{"a": 1}, {}, {}], "args must be a list, got dict"),
        ([[1], ["scale"], {}], "kwargs must be an object with string keys, got list"),
        ([[1], {}, "embed"], "embed must be an object, got str"),
        ([[1], {}], "protocol 2 body must be [args, kwargs, embed]"),
        ({"args": [1]}, "protocol 2 body must be [args, kwargs, embed]"),
    ],
)
def test_protocol_2_body_of_the_wrong_shape(body: Any, reason: str) -> None:
    raw, task_id = publish(args=[1])

    item = undecodable(with_body(raw, json.dumps(body).encode()))

    assert reason in str(item.error)
    assert (item.task_id, item.task) == (task_id, TASK)


def test_protocol_2_without_an_id_header() -> None:
    raw, _ = publish(args=[1])

    item = undecodable(tampered(raw, lambda envelope: envelope["headers"].pop("id")))

    assert "protocol 2 message has no task id header" in str(item.error)
    assert (item.task_id, item.task) == (None, TASK)


def test_eta_that_is_not_a_time() -> None:
    raw, task_id = publish(args=[1])

    def change(envelope: dict[str, Any]) -> None:
        envelope["headers"]["eta"] = "next tuesday"

    item = undecodable(tampered(raw, change))

    assert "eta is not an ISO 8601 time: 'next tuesday'" in str(item.error)
    assert item.task_id == task_id


def test_protocol_1_with_bad_args_keeps_the_task_id_from_the_body() -> None:
    raw, task_id = publish(protocol=1, args=[1])
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    body["args"] = "not a list"

    item = undecodable(with_body(raw, json.dumps(body).encode()))

    assert "args must be a list, got str" in str(item.error)
    assert (item.task_id, item.task) == (task_id, TASK)


def test_neither_protocol() -> None:
    raw, _ = publish(protocol=1, args=[1])

    item = undecodable(with_body(raw, json.dumps({"args": [1]}).encode()))

    assert "neither protocol 2 headers nor a protocol 1 body with 'id' and 'task'" in str(item.error)
    assert item.task_id is None
