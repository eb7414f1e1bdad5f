"""Property test: whatever lands in a batch queue, the consumer settles every message and gets stuck on none.

Each example fills the real queue (real ``redis-server``) with a random mix of valid requests, published with
``delay``/``apply_async``/``send_task``, and malformed elements pushed straight into the queue's lists; then
``BatchConsumer.drain()`` serves it in-process. Afterwards every valid request is SUCCESS with its value, every
malformed message whose task id can be read is FAILURE with a readable error of the expected type, every other
one is in the dead-letter list with a reason, and the queue lists, claims and delayed set are empty. A pickle body
is a trap: unpickling it would create a directory, which must never appear.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching import DeadLetter, batched
from batching.errors import ContentDisallowed, MessageError, MissingArgumentError, UnexpectedArgumentError
from batching.store.queue import QueueStore
from batching.worker.consumer import BatchConsumer

pytestmark = pytest.mark.integration

#: The fuzz task's max_message_bytes: small, so that a real request with one long argument goes over it.
LIMIT = 4096
BATCH_SIZE = 8


def scale(x: list[Any], factor: Any = 2) -> list[Any]:
    """Per-request errors for wrong types, so that a bad request fails alone and never takes its batch down."""
    return [
        v * f if type(v) is int and type(f) is int else TypeError(f"x and factor must be integers, got {v!r}, {f!r}")
        for v, f in zip(x, factor, strict=True)
    ]


class Trap:
    """Unpickling this creates the directory ``path``: proof that a body was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@dataclass
class Totals:
    examples: int = 0
    messages: int = 0
    success: int = 0
    failure: int = 0
    dead: int = 0
    crashes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class Fuzz:
    app: Celery
    task: Any
    store: QueueStore
    consumer: BatchConsumer
    template: dict[str, Any]
    trap_path: Path
    totals: Totals


@pytest.fixture(scope="module")
def fuzz(redis_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Fuzz]:
    app = Celery("fuzz", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(result_expires=600)
    task = batched(app, scale, name=f"fuzz.scale_{uuid.uuid4().hex[:8]}", batch_size=BATCH_SIZE,
                   max_message_bytes=LIMIT)
    store, connection = QueueStore.open(task.app, task.batching)
    # One real envelope, taken off the queue before any consumer sees it, to derive malformed ones from.
    task.delay(x=0)
    raw = store.client.rpop(store.keys.main)
    assert isinstance(raw, bytes)
    template = json.loads(raw)

    trap_dir = tmp_path_factory.mktemp("trap")
    armed = trap_dir / "armed"
    pickle.loads(pickle.dumps(Trap(armed)))  # the trap works: loading it does create the directory
    assert armed.exists()

    totals, consumer = Totals(), BatchConsumer.for_task(task)
    yield Fuzz(app, task, store, consumer, template, trap_dir / "unpickled", totals)
    consumer.stop(timeout=5)  # no threads were started: this releases its broker connection
    connection.release()
    app.close()
    summary = (
        f"fuzz: {totals.examples} examples, {totals.messages} messages: {totals.success} SUCCESS, "
        f"{totals.failure} FAILURE, {totals.dead} dead-lettered, {totals.crashes} crashes; "
        f"kinds: {dict(sorted(totals.kinds.items()))}"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{summary}")


# -- what each message is expected to become ---------------------------------------------------------------------


@dataclass(frozen=True)
class Success:
    task_id: str
    value: int


@dataclass(frozen=True)
class Failure:
    task_id: str
    error: type[BaseException]


@dataclass(frozen=True)
class Dead:
    raw: bytes


Expected = Success | Failure | Dead
#: A message maker: given the fixture, publishes or pushes one message and says what it must become.
Maker = Callable[[Fuzz], Expected]


#: Changes an envelope in place (the fixture is passed along for the pickle trap's path).
Change = Callable[[dict[str, Any], Fuzz], None]


def envelope(fz: Fuzz, change: Change) -> tuple[dict[str, Any], str]:
    """A copy of the captured envelope under a fresh task id, changed by ``change``."""
    env = json.loads(json.dumps(fz.template))
    task_id = str(uuid.uuid4())
    env["headers"].update(id=task_id, root_id=task_id)
    env["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    change(env, fz)
    return env, task_id


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(args: Any, kwargs: Any, embed: Any = None) -> str:
    return b64(json.dumps([args, kwargs, embed or {}]).encode())


@st.composite
def pushes(draw: st.DrawFn) -> Callable[[Fuzz, bytes], None]:
    """Straight into one of the queue's lists, at the newest end (as kombu does) or the oldest."""
    step = draw(st.integers(0, 3))
    left = draw(st.booleans())

    def push(fz: Fuzz, raw: bytes) -> None:
        key = fz.store.keys.lists[step]
        (fz.store.client.lpush if left else fz.store.client.rpush)(key, raw)

    return push


#: What a message must become, given its task id and the bytes pushed.
Outcome = Callable[[str, bytes], Expected]


def fails(error: type[BaseException]) -> Outcome:
    return lambda task_id, _raw: Failure(task_id, error)


def succeeds(value: int) -> Outcome:
    return lambda task_id, _raw: Success(task_id, value)


def dead(_task_id: str, raw: bytes) -> Expected:
    return Dead(raw)


def pushed(kind: str, change: Change, outcome: Outcome) -> Any:
    """A copy of a real envelope under a fresh id, changed by ``change``, pushed straight into a queue list."""

    @st.composite
    def make(draw: st.DrawFn) -> tuple[str, Maker]:
        push = draw(pushes())

        def maker(fz: Fuzz) -> Expected:
            env, task_id = envelope(fz, change)
            raw = json.dumps(env).encode()  # NaN/Infinity pass, as kombu's json reads them
            push(fz, raw)
            return outcome(task_id, raw)

        return kind, maker

    return make()


def pushed_bytes(kind: str, raws: st.SearchStrategy[bytes]) -> Any:
    """Any bytes at all, pushed straight into a queue list: with no task id to fail, they are dead-lettered."""

    @st.composite
    def make(draw: st.DrawFn) -> tuple[str, Maker]:
        raw, push = draw(raws), draw(pushes())

        def maker(fz: Fuzz) -> Expected:
            push(fz, raw)
            return Dead(raw)

        return kind, maker

    return make()


def published(kind: str, send: Callable[[Fuzz, Any], Expected], values: st.SearchStrategy[Any]) -> Any:
    """Sent through Celery for real (``delay``, ``apply_async``, ``send_task``)."""
    return st.tuples(st.just(kind), values.map(lambda v: lambda fz: send(fz, v)))


def _at(env: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, last = path.split(".")
    for p in parents:
        env = env[p]
    return env, last


def _set(path: str, value: Any) -> Change:
    def change(env: dict[str, Any], fz: Fuzz) -> None:
        target, key = _at(env, path)
        target[key] = value

    return change


def _drop(path: str) -> Change:
    def change(env: dict[str, Any], fz: Fuzz) -> None:
        target, key = _at(env, path)
        del target[key]

    return change


def _pickled(compressed: bool) -> Change:
    def change(env: dict[str, Any], fz: Fuzz) -> None:
        payload = pickle.dumps(Trap(fz.trap_path))
        if compressed:
            payload = zlib.compress(payload)
            env["headers"]["compression"] = "application/x-gzip"
        env["content-type"] = "application/x-python-serialize"
        env["content-encoding"] = "binary"
        env["body"] = b64(payload)

    return change


def _protocol_1(x: int) -> Change:
    def change(env: dict[str, Any], fz: Fuzz) -> None:
        task_id = env["headers"]["id"]
        env["headers"] = {}
        env["body"] = b64(json.dumps({"id": task_id, "task": fz.task.name, "args": [x], "kwargs": {}}).encode())

    return change


ints = st.integers(-10**6, 10**6)

VALID = st.one_of(
    published("delay kwargs", lambda fz, x: Success(fz.task.delay(x=x).id, x * 2), ints),
    published("delay args", lambda fz, v: Success(fz.task.delay(v[0], v[1]).id, v[0] * v[1]), st.tuples(ints, ints)),
    published(
        "priority",
        lambda fz, v: Success(fz.task.apply_async(kwargs={"x": v[0]}, priority=v[1]).id, v[0] * 2),
        st.tuples(ints, st.integers(0, 9)),
    ),
    published(
        "send_task",
        lambda fz, x: Success(fz.app.send_task(fz.task.name, kwargs={"x": x, "factor": 3}).id, x * 3),
        ints,
    ),
    ints.flatmap(lambda x: pushed("protocol 1", _protocol_1(x), succeeds(x * 2))),
    # absurd per-request time limits are no limits (the template's request is x=0)
    pushed("timelimit not finite", _set("headers.timelimit", [float("inf"), float("nan")]), succeeds(0)),
    pushed("timelimit junk", _set("headers.timelimit", ["soon", {"a": 1}]), succeeds(0)),
)

MALFORMED = st.one_of(
    # published, but unusable: failed with the task's id
    published("wrong type", lambda fz, x: Failure(fz.task.delay(x=x).id, TypeError),
              st.one_of(st.text(max_size=8), st.floats(allow_nan=False), st.none(), st.lists(ints, max_size=2))),
    published("missing argument",
              lambda fz, f: Failure(fz.app.send_task(fz.task.name, kwargs={"factor": f}).id, MissingArgumentError),
              ints),
    published("unknown argument",
              lambda fz, x: Failure(fz.app.send_task(fz.task.name, kwargs={"x": x, "colour": "red"}).id,
                                    UnexpectedArgumentError), ints),
    published("too many positional",
              lambda fz, x: Failure(fz.app.send_task(fz.task.name, args=[x, 1, 2]).id, UnexpectedArgumentError),
              ints),
    published("over max_message_bytes", lambda fz, n: Failure(fz.task.delay(x="a" * n).id, MessageError),
              st.integers(LIMIT, 3 * LIMIT)),
    # malformed, with a readable task id: FAILURE
    pushed("no body", _drop("body"), fails(MessageError)),
    pushed("body not base64", _set("body", "@@ not base64 @@"), fails(MessageError)),
    pushed("body not a string", _set("body", 12345), fails(MessageError)),
    pushed("base64 of garbage", _set("body", b64(b"\x00\xffgarbage\xfe")), fails(MessageError)),
    pushed("no content-type", _drop("content-type"), fails(MessageError)),
    pushed("unknown content-type", _set("content-type", "application/x-fuzz"), fails(ContentDisallowed)),
    pushed("raw content-type (never checked by accept)", _set("content-type", "application/data"),
           fails(MessageError)),
    pushed("pickle", _pickled(compressed=False), fails(ContentDisallowed)),
    pushed("zlib pickle", _pickled(compressed=True), fails(ContentDisallowed)),
    pushed("bad compression", _set("headers.compression", "application/x-gzip"), fails(MessageError)),
    pushed("unknown task", _set("headers.task", "fuzz.no_such_task"), fails(MessageError)),
    pushed("args not a list", _set("body", body({"x": 1}, {})), fails(MessageError)),
    pushed("kwargs not an object", _set("body", body([], [1, 2])), fails(MessageError)),
    pushed("kombu-tagged bytes argument", _set("body", body([], {"x": {"__type__": "bytes", "__value__": "hi"}})),
           fails(TypeError)),
    pushed("body not [args, kwargs, embed]", _set("body", b64(b'{"x": 1}')), fails(MessageError)),
    pushed("embed not an object", _set("body", b64(b'[[], {"x": 1}, [1]]')), fails(MessageError)),
    pushed("no task header", _drop("headers.task"), fails(MessageError)),
    pushed("eta not a time", _set("headers.eta", "next tuesday"), fails(MessageError)),
    pushed("properties not an object", _set("properties", "nope"), fails(MessageError)),
    pushed("eta a kombu type tag", _set("headers.eta", {"__type__": "datetime", "__value__": "zz"}),
           fails(MessageError)),
    # no readable task id: dead-lettered
    pushed("no id header", _drop("headers.id"), dead),
    pushed("headers not an object", _set("headers", ["id", "task"]), dead),
    pushed("task id a lone surrogate", _set("headers.id", "\udcff"), dead),  # no Redis key can hold it
    pushed_bytes("not JSON", st.sampled_from([b"hello", b"{", b"{'body': 1}", b"\x80abc", b""])),
    pushed_bytes("JSON, not an object", st.sampled_from([b"[]", b"[1, 2]", b"42", b'"body"', b"null", b"true"])),
    pushed_bytes("arbitrary bytes", st.binary(max_size=64)),
    pushed_bytes("invalid UTF-8", st.binary(max_size=32).map(lambda b: b"\xff" + b + b"\xc3")),
    pushed_bytes("over the limit, no id", st.integers(LIMIT + 1, 2 * LIMIT).map(lambda n: b"\xfe" * n)),
)

#: About a third valid requests, the rest malformed.
ALL = st.integers(0, 2).flatmap(lambda n: VALID if n == 0 else MALFORMED)


def reset(fz: Fuzz) -> None:
    k = fz.store.keys
    stale = list(fz.store.client.scan_iter(match=k.claim("*")))  # only after a failed example
    fz.store.client.delete(*k.lists, k.claims, k.delayed, k.dead, k.deliveries, *stale)


def leftovers(fz: Fuzz) -> dict[str, int]:
    c, k = fz.store.client, fz.store.keys
    left = {key: c.llen(key) for key in k.lists}
    left["claims"] = c.zcard(k.claims)
    left["claim lists"] = sum(1 for _ in c.scan_iter(match=k.claim("*")))
    left["delayed"] = c.zcard(k.delayed)
    return {key: n for key, n in left.items() if n}


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.integers(1, 60).flatmap(lambda n: st.lists(ALL, min_size=n, max_size=n)))
def test_every_message_is_settled_and_nothing_is_stuck(fuzz: Fuzz, messages: list[tuple[str, Maker]]) -> None:
    fz, totals = fuzz, fuzz.totals
    reset(fz)
    expected = [maker(fz) for _kind, maker in messages]
    totals.examples += 1
    totals.messages += len(expected)
    totals.kinds.update(kind for kind, _ in messages)

    try:
        claimed = fz.consumer.drain()
    except Exception:
        totals.crashes += 1
        raise
    assert claimed == len(expected)
    assert not fz.trap_path.exists(), "a pickle body was unpickled"
    assert leftovers(fz) == {}, "messages left in the queue, in a claim or parked"

    letters = [DeadLetter.parse(e) for e in fz.store.dead_letters()]
    assert all(d.reason and d.queue == fz.store.keys.queue for d in letters), letters
    assert Counter(d.raw for d in letters) == Counter(e.raw for e in expected if isinstance(e, Dead))
    for e in expected:
        if isinstance(e, Success):
            r = fz.app.AsyncResult(e.task_id)
            assert (r.state, r.result) == (states.SUCCESS, e.value)
            totals.success += 1
        elif isinstance(e, Failure):
            r = fz.app.AsyncResult(e.task_id)
            assert r.state == states.FAILURE, (e, r.state, r.result)
            assert isinstance(r.result, e.error), (e, r.result)
            assert str(r.result).strip(), e
            totals.failure += 1
        else:
            totals.dead += 1
