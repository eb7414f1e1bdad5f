"""When two requests are "identical" for ``@batched(..., coalesce=True)``, and how a batch runs each input once.

Two requests are identical when they are for the same task and their arguments, bound to the model's parameters
with omitted ones filled by their defaults, have the same canonical JSON: keys sorted, no whitespace. So
``predict("hi")``, ``predict(text="hi")`` and ``predict("hi", scale=1.0)`` (1.0 being the default) are identical;
``1`` and ``1.0`` are not (JSON keeps them apart, and a model may treat an int and a float differently), nor are
``True`` and ``1``, nor ``NaN`` and ``None``; a tuple and a list with the same items are (a JSON message carries
both as a list). Requests whose arguments have no JSON form (bytes, objects through pickle, a non-JSON default)
or do not bind to the signature are never coalesced: they run on their own, as without the option.

Pure code, shared by the worker (which coalesces through Redis) and its tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import MissingArgumentError, UnexpectedArgumentError
from .merge import CallSpec

#: One serializer for every worker of a queue (workers of different versions must agree): the standard library's,
#: which keeps NaN and Infinity apart from ``null`` (orjson writes them as ``null``).
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=True, ensure_ascii=True).encode


def request_key(task_name: str, spec: CallSpec, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """The coalescing key of one request (a hex digest), or ``None`` if it must run on its own."""
    try:
        bound = spec.bind(args, kwargs)
    except (MissingArgumentError, UnexpectedArgumentError):
        return None  # merge fails it on its own, with the same error
    full = {name: bound[name] if name in bound else spec.defaults[name] for name in spec.names}
    full.update(bound)  # names that only arrive through **kwargs
    try:
        text = _encode([task_name, full])
    except (TypeError, ValueError):
        return None
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def distinct(keys: Sequence[str | None]) -> tuple[list[int], list[int]]:
    """Which requests of a batch go to the model, and where each request finds its result.

    Returns ``(run, source)``: ``run`` are the indices of the first request of each key (and of every keyless one),
    in order; request *i*'s result is the ``source[i]``-th result of running ``run``.
    """
    first: dict[str, int] = {}
    run: list[int] = []
    source: list[int] = []
    for index, key in enumerate(keys):
        if key is None:
            source.append(len(run))
            run.append(index)
        elif (slot := first.get(key)) is not None:
            source.append(slot)
        else:
            first[key] = len(run)
            source.append(len(run))
            run.append(index)
    return run, source
