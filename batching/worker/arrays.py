"""Results that are arrays: numpy arrays and scalars, torch tensors, and lists of them.

A model that returns an embedding per request would otherwise pay for JSON encoding float by float in Python
(``.tolist()`` then the standard encoder: about 60 µs for 384 floats). Under the JSON result serializer an array is
encoded by orjson (``OPT_SERIALIZE_NUMPY``, in C) into exactly the JSON that ``json.dumps(array.tolist())`` reads
back as: floats are widened to float64 first, since orjson writes a float32 by its own shortest form (``0.1``),
which reads back as a different float64 than the float32's ``.tolist()`` value (``0.10000000149011612``). Arrays
holding NaN or infinities, and dtypes orjson does not take, go through ``.tolist()`` and kombu's encoder, which
writes ``NaN`` where orjson would write ``null``. Clients therefore get lists of floats through ``get()``, the same
values as before. Other serializers: pickle stores the arrays themselves; any other (msgpack, yaml) gets the
``.tolist()`` values.

numpy is never imported here: a value can only be an array if its module is already loaded.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson


def _numpy() -> Any:
    return sys.modules.get("numpy")


def _as_array(value: Any, np: Any) -> Any:
    """``value`` as a numpy array or scalar if it is one, or a torch tensor (moved to the CPU); else None."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return None


def json_fragment(value: Any) -> str | None:
    """The JSON text of an array result (or a list or tuple of arrays), or None when ``value`` is none of these or
    needs the standard encoder (NaN, infinities, object or complex dtypes); then ``plain(value)`` does."""
    np = _numpy()
    if np is None:
        return None
    array = _as_array(value, np)
    if array is not None:
        return _fragment(array, np)
    if isinstance(value, (list, tuple)) and value:
        parts: list[str] = []
        for element in value:
            array = _as_array(element, np)
            text = None if array is None else _fragment(array, np)
            if text is None:
                return None
            parts.append(text)
        return "[" + ",".join(parts) + "]"
    return None


def _fragment(array: Any, np: Any) -> str | None:
    kind = array.dtype.kind
    if kind == "f":
        if not np.isfinite(array).all():
            return None
        if array.dtype != np.float64:
            array = array.astype(np.float64)
    elif kind not in "iub":
        return None
    if array.ndim == 0:  # a numpy scalar or a 0-d array
        array = array.item()
    try:
        return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except orjson.JSONEncodeError:  # not C-contiguous, say: the standard encoder decides
        return None


def plain(value: Any) -> Any:
    """``value`` with arrays, tensors, numpy scalars and lists or tuples of them turned into Python values
    (``.tolist()``): what a serializer that cannot carry numpy types stores."""
    np = _numpy()
    if np is None:
        return value
    array = _as_array(value, np)
    if array is not None:
        return array.tolist()
    # The first element decides, so that a long list of plain floats is not scanned.
    if isinstance(value, (list, tuple)) and value and _as_array(value[0], np) is not None:
        return [plain(element) for element in value]
    return value
