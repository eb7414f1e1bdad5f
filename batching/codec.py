"""Raw queue element -> request: decode what kombu's Redis transport stored for a Celery task message.

A list element is kombu's JSON envelope ``{body, content-type, content-encoding, headers, properties}``; the body
is (base64 of) the serialized protocol-2 tuple ``[args, kwargs, embed]``, or a protocol-1 dict. Deserialization
goes through kombu's registry, so ``accept_content`` is enforced exactly as in a normal worker: a pickle body
is never unpickled unless the app accepts pickle.
"""

from __future__ import annotations

import binascii
import bz2
import json
import lzma
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from kombu import compression, serialization
from kombu.exceptions import ContentDisallowed as KombuContentDisallowed

from .errors import ContentDisallowed, MessageError


@dataclass(slots=True)
class Request:
    """One task message, ready to join a batch."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]
    embed: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None


@dataclass(slots=True)
class Undecodable:
    """A message that cannot become a request; ``task_id`` is set when a FAILURE can still be stored for it."""

    error: MessageError
    task_id: str | None = None
    task: str | None = None


def decode(raw: bytes, accept: Collection[str] | None, max_bytes: int | None = None) -> Request | Undecodable:
    """Decode one queue element. Never raises for bad input: what cannot be used comes back as ``Undecodable``.

    ``max_bytes`` caps a compressed body's decompressed size: it is inflated incrementally and given up as soon as
    it would pass the cap, so a small message that inflates to gigabytes never does.
    """
    task_id: str | None = None
    task: str | None = None
    try:
        # The envelope is plain JSON (kombu's own hooks only matter inside the body): a C decoder is enough.
        envelope = _json_loads(raw)
        if not isinstance(envelope, dict):
            raise MessageError("not a kombu message envelope (a JSON object with a 'body')")
        # Headers first: once the task id is known, any later failure can still be stored as that task's FAILURE.
        headers = _mapping(envelope.get("headers"), "headers")
        task_id = _task_id(headers.get("id"))
        task = _text_or_none(headers.get("task"))
        if "body" not in envelope:
            raise MessageError("not a kombu message envelope (a JSON object with a 'body')")
        properties = _mapping(envelope.get("properties"), "properties")
        body = _payload(envelope, headers, properties, accept, max_bytes)
        if "task" in headers:
            return _protocol2(body, headers, properties)
        if isinstance(body, dict):  # protocol 1 keeps the id in the body
            task_id = _task_id(body.get("id"))
            task = _text_or_none(body.get("task"))
        return _protocol1(body, headers, properties)
    except MessageError as exc:
        return Undecodable(exc, task_id, task)
    except Exception as exc:  # any other decoder failure is still just a bad message
        return Undecodable(MessageError(f"undecodable message: {type(exc).__name__}: {exc}"), task_id, task)


def task_id_of(raw: bytes, accept: Collection[str] | None) -> str | None:
    """The task id of a raw message, if it can be read that far.

    A protocol 2 message has it in its headers, read without touching the body (which may be what killed the
    consumers that took it); only a protocol 1 message's body is decoded, within a small decompression cap.
    """
    try:
        envelope = _json_loads(raw)
        headers = envelope.get("headers") if isinstance(envelope, dict) else None
        if isinstance(headers, dict) and "task" in headers:
            return _task_id(headers.get("id"))
    except Exception:
        return None
    item = decode(raw, accept, max_bytes=1 << 20)
    return item.id if isinstance(item, Request) else item.task_id


#: Streaming decompressors for kombu's built-in compression types; others are inflated whole, then checked.
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "application/x-gzip": zlib.decompressobj,
    "application/x-bz2": bz2.BZ2Decompressor,
    "application/x-lzma": lzma.LZMADecompressor,
}


def _decompress(body: bytes, method: str, max_bytes: int | None) -> bytes:
    content_type = compression._aliases.get(method, method)
    factory = _DECOMPRESSORS.get(content_type)
    if factory is None or max_bytes is None:
        out: bytes = compression.decompress(body, method)
    else:
        decompressor = factory()
        out = decompressor.decompress(body, max_bytes + 1)
        if len(out) <= max_bytes and not getattr(decompressor, "eof", True):
            # Not at the end of the stream and under the cap: the input must be truncated.
            raise MessageError("compressed body is truncated")
    if max_bytes is not None and len(out) > max_bytes:
        raise MessageError(
            f"compressed body inflates past this task's limit of {max_bytes:,} bytes (max_message_bytes); "
            "it was not decompressed further"
        )
    return out


def _payload(
    envelope: Mapping[str, Any], headers: Mapping[str, Any], properties: Mapping[str, Any], accept: Any,
    max_bytes: int | None,
) -> Any:
    body = envelope["body"]
    if properties.get("body_encoding") == "base64":
        if not isinstance(body, str):
            raise MessageError("body is declared base64 but is not a string")
        try:
            # strict_mode validates in C what b64decode(validate=True) checks with a regular expression.
            body = binascii.a2b_base64(body, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or a non-ASCII string
            raise MessageError(f"body is not valid base64: {exc}") from exc
    content_type = envelope.get("content-type")
    if not isinstance(content_type, str):
        raise MessageError("message has no content-type")
    if headers.get("compression"):
        try:
            body = _decompress(body, headers["compression"], max_bytes)
        except MessageError:
            raise
        except Exception as exc:
            raise MessageError(f"cannot decompress body ({headers['compression']}): {exc}") from exc
    encoding = envelope.get("content-encoding") or "utf-8"
    if (
        content_type == "application/json" and encoding == "utf-8" and isinstance(body, bytes)
        and (accept is None or content_type in accept) and b'"__type__"' not in body
    ):
        # kombu's JSON decoder differs from the C one only in turning {"__type__": ...} objects back into
        # datetimes, bytes, UUIDs...: without one in the body, the C decoder gives the same result, 3x faster.
        try:
            return _json_loads(body)
        except ValueError as exc:
            raise MessageError(f"cannot deserialize {content_type!r} body: {type(exc).__name__}: {exc}") from exc
    try:
        return serialization.loads(body, content_type, encoding, accept=accept)
    except KombuContentDisallowed as exc:
        raise ContentDisallowed(f"content type {content_type!r} is not accepted by this app: {exc}") from exc
    except Exception as exc:
        raise MessageError(f"cannot deserialize {content_type!r} body: {type(exc).__name__}: {exc}") from exc


def _json_loads(data: bytes) -> Any:
    """orjson where it agrees with the standard library, which decides everything orjson refuses.

    orjson is about three times faster on kombu envelopes but rejects what Python's json accepts at the edges
    (integers beyond 64 bits, NaN and Infinity): those fall back to ``json.loads``, so results never differ.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _protocol2(body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> Request:
    task_id, task = _task_id(headers.get("id")), headers.get("task")
    if task_id is None:
        raise MessageError("protocol 2 message has no task id header")
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise MessageError("protocol 2 body must be [args, kwargs, embed]")
    args, kwargs, embed = body
    return Request(
        id=task_id,
        task=str(task),
        args=_args(args),
        kwargs=_kwargs(kwargs),
        headers=headers,
        properties=properties,
        embed=_mapping(embed, "embed"),
        eta=_timestamp(headers.get("eta"), "eta"),
        expires=_timestamp(headers.get("expires"), "expires"),
    )


def _protocol1(body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> Request:
    if not isinstance(body, dict) or _task_id(body.get("id")) is None or not isinstance(body.get("task"), str):
        raise MessageError("message has neither protocol 2 headers nor a protocol 1 body with 'id' and 'task'")
    merged_headers = {**headers, **{k: v for k, v in body.items() if k not in ("args", "kwargs")}}
    return Request(
        id=body["id"],
        task=body["task"],
        args=_args(body.get("args", [])),
        kwargs=_kwargs(body.get("kwargs", {})),
        headers=merged_headers,
        properties=properties,
        embed={k: body[k] for k in ("callbacks", "errbacks", "chord") if body.get(k)},
        eta=_timestamp(body.get("eta"), "eta"),
        expires=_timestamp(body.get("expires"), "expires"),
    )


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessageError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _args(value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"args must be a list, got {type(value).__name__}")
    return list(value)


def _kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(map(str.__instancecheck__, value)):
        raise MessageError(f"kwargs must be an object with string keys, got {type(value).__name__}")
    return value


def _task_id(value: Any) -> str | None:
    """A task id a result can be stored under, or None.

    A JSON ``\\udXXX`` escape can spell a lone surrogate, which no Redis key can hold: storing a result under it
    would raise and lose the results of its whole batch. Such an id counts as unreadable (the message is
    dead-lettered, not failed).
    """
    text = _text_or_none(value)
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _timestamp(value: Any, what: str) -> float | None:
    """Celery sends ``eta``/``expires`` as ISO 8601 strings; naive ones are UTC, as in Celery's own worker."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise MessageError(f"{what} must be an ISO 8601 time, got {type(value).__name__}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MessageError(f"{what} is not an ISO 8601 time: {value!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
