"""Per-request calls in, one batch call out, and back: the batching semantics shared by every path.

A model's per-request signature (``predict(text, scale=1.0)`` or ``Model.run(self, text, scale=1.0)``) decides
which arguments a request may carry and what an omitted one defaults to. ``merge`` turns N requests into one
keyword call where every parameter is a list of N values; ``split`` turns what ``run_batch`` returned back into N
outcomes. Nothing here does I/O, so the in-process ``Batcher`` and the Redis consumer behave identically.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from .errors import BatchResultError, ConfigurationError, MissingArgumentError, UnexpectedArgumentError

logger = logging.getLogger(__name__)

#: Errors that say nothing about the inputs (time limits, memory, the network): re-running halves of the batch
#: would only repeat them.
NEVER_BISECT: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded, TimeLimitExceeded, MemoryError, OSError)

#: Marks a parameter without a default. ``inspect.Parameter.empty`` is not used directly so that a default of
#: ``None``, ``0``, ``False`` or ``""`` is never confused with "required" (a bug of the batcher this replaces).
REQUIRED: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class CallSpec:
    """The per-request parameters of a model: their order, their defaults, and whether extra names pass."""

    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    accepts_any_keyword: bool = False
    #: Parameters after ``*`` (or ``*args``): they cannot be filled positionally, as in a plain Python call.
    keyword_only: frozenset[str] = frozenset()

    @classmethod
    def from_callable(cls, fn: Callable[..., Any]) -> CallSpec:
        """Read the spec from a function, or from a bound ``run`` method (``self`` is already gone there)."""
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of {fn!r}: {exc}") from exc
        names: list[str] = []
        defaults: dict[str, Any] = {}
        keyword_only: set[str] = set()
        any_keyword = False
        for param in sig.parameters.values():
            if param.kind is param.VAR_POSITIONAL:
                raise ConfigurationError(
                    f"{fn!r} takes *{param.name}: batched parameters need names, so that each can become a list"
                )
            if param.kind is param.VAR_KEYWORD:
                any_keyword = True
                continue
            names.append(param.name)
            if param.kind is param.KEYWORD_ONLY:
                keyword_only.add(param.name)
            if param.default is not REQUIRED:
                defaults[param.name] = param.default
        if not names and not any_keyword:
            raise ConfigurationError(f"{fn!r} takes no parameters: there is nothing to batch")
        return cls(tuple(names), defaults, any_keyword, frozenset(keyword_only))

    @functools.cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n not in self.defaults)

    @property
    def positional(self) -> tuple[str, ...]:
        """The parameters a positional argument can fill, in order (keyword-only ones always come last)."""
        return tuple(n for n in self.names if n not in self.keyword_only)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Map one request's positional and keyword arguments to parameter names, without filling defaults.

        Raises ``UnexpectedArgumentError`` (a ``TypeError``) for surplus positionals, unknown or doubled names, and
        ``MissingArgumentError`` (a ``ValueError`` and a ``TypeError``) naming every required argument left out.
        """
        positional = self.positional
        if len(args) > len(positional):
            raise UnexpectedArgumentError(
                f"takes {len(positional)} positional argument(s) ({', '.join(positional)}) but {len(args)} were given"
            )
        bound = dict(zip(positional, args, strict=False))
        doubled = sorted(set(bound) & set(kwargs))
        if doubled:
            raise UnexpectedArgumentError(f"got multiple values for argument(s): {', '.join(doubled)}")
        if not self.accepts_any_keyword:
            unknown = sorted(set(kwargs) - set(self.names))
            if unknown:
                raise UnexpectedArgumentError(
                    f"got unexpected argument(s): {', '.join(unknown)}; accepted: {', '.join(self.names)}"
                )
        bound.update(kwargs)
        missing = [n for n in self.required if n not in bound]
        if missing:
            raise MissingArgumentError(f"missing required argument(s): {', '.join(missing)}")
        return bound

    def merge(self, requests: Sequence[tuple[Sequence[Any], Mapping[str, Any]]]) -> Merged:
        """Bind every request; reject the ones that cannot be bound; build one list per parameter for the rest.

        Parameters a request omits get their default; names that only arrive through ``**kwargs`` get ``None``
        for the requests that omit them.
        """
        uniform = self._merge_uniform(requests)
        if uniform is not None:
            return uniform
        merged = Merged()
        bound_ok: list[dict[str, Any]] = []
        for index, (args, kwargs) in enumerate(requests):
            try:
                bound = self.bind(args, kwargs)
            except (MissingArgumentError, UnexpectedArgumentError) as exc:
                merged.rejected[index] = exc
                continue
            merged.positions.append(index)
            bound_ok.append(bound)
        names = list(self.names)
        if self.accepts_any_keyword:
            extra = {name for bound in bound_ok for name in bound} - set(names)
            names.extend(sorted(extra))
        for name in names:
            default = self.defaults.get(name)
            merged.kwargs[name] = [bound.get(name, default) for bound in bound_ok]
        return merged

    def _merge_uniform(self, requests: Sequence[tuple[Sequence[Any], Mapping[str, Any]]]) -> Merged | None:
        """The common case, where every request has the same shape (as many positionals, the same keyword names:
        one client code path): bound once, then one list per parameter. None when shapes differ or the shape does
        not bind, for the general path to decide request by request. Same result as the general path, without its
        dict per request (which was nine tenths of merging a no-op batch).
        """
        if not requests:
            return None
        first_args, first_kwargs = requests[0]
        nargs, keys = len(first_args), first_kwargs.keys()
        for args, kwargs in requests:
            if len(args) != nargs or kwargs.keys() != keys:
                return None
        try:
            bound = self.bind(first_args, first_kwargs)
        except (MissingArgumentError, UnexpectedArgumentError):
            return None
        size = len(requests)
        merged = Merged(positions=list(range(size)))
        names = list(self.names)
        if self.accepts_any_keyword:
            names.extend(sorted(set(bound) - set(names)))
        index = {name: i for i, name in enumerate(self.positional[:nargs])}
        for name in names:
            if name in index:
                i = index[name]
                merged.kwargs[name] = [args[i] for args, _ in requests]
            elif name in bound:
                merged.kwargs[name] = [kwargs[name] for _, kwargs in requests]
            else:
                merged.kwargs[name] = [self.defaults.get(name)] * size
        return merged


@dataclass
class Merged:
    """One batch call: ``kwargs`` holds a list per parameter, slot *k* of each belonging to ``positions[k]``."""

    kwargs: dict[str, list[Any]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    rejected: dict[int, BaseException] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.positions)


def split(results: Any, size: int) -> list[Any]:
    """Check that ``run_batch`` gave one result per request and return them as a list.

    Any sized iterable works (a list, a tuple, a numpy array); an ``Exception`` instance at position *i* is request
    *i*'s failure and is left in place for the caller to report.
    """
    if isinstance(results, (str, bytes, Mapping)) or not hasattr(results, "__len__"):
        raise BatchResultError(
            f"run_batch must return a sequence with one result per request; got {type(results).__name__} "
            f"for a batch of {size}"
        )
    try:
        out = list(results)
    except TypeError as exc:  # sized but not iterable, e.g. a 0-d numpy array
        raise BatchResultError(
            f"run_batch must return a sequence with one result per request; got {type(results).__name__} "
            f"for a batch of {size}: {exc}"
        ) from exc
    if len(out) != size:
        raise BatchResultError(f"run_batch returned {len(out)} results for a batch of {size} requests")
    return out


def execute(
    spec: CallSpec,
    run_batch: Callable[..., Any],
    requests: Sequence[tuple[Sequence[Any], Mapping[str, Any]]],
    *,
    isolate: bool = False,
) -> list[Any]:
    """Run one batch and return one outcome per request, in request order; an ``Exception`` is a failure.

    Requests that cannot be bound fail alone. A result list of the wrong length fails every request that reached
    ``run_batch`` (the model is wrong, not an input). If ``run_batch`` raises, every request fails with that error
    — unless ``isolate``, in which case the batch is bisected to find the request(s) that make it raise: innocent
    requests get their results and only the culprits fail, with the exception their own sub-batch raised.
    """
    merged = spec.merge(requests)
    outcomes: list[Any] = [None] * len(requests)
    for index, exc in merged.rejected.items():
        outcomes[index] = exc
    if merged.positions:
        results = _run(run_batch, merged.kwargs, len(merged), isolate)
        for index, result in zip(merged.positions, results, strict=True):
            outcomes[index] = result
    return outcomes


def _run(run_batch: Callable[..., Any], kwargs: dict[str, list[Any]], size: int, isolate: bool) -> list[Any]:
    try:
        return split(run_batch(**kwargs), size)
    except BatchResultError as exc:
        return [exc] * size
    except Exception as exc:  # the model's own error, whatever its type, belongs to the requests that caused it
        if not isolate or size == 1 or isinstance(exc, NEVER_BISECT):
            return [exc] * size
        return _bisect(run_batch, kwargs, size, exc)


def _bisect(run_batch: Callable[..., Any], kwargs: dict[str, list[Any]], size: int, error: Exception) -> list[Any]:
    """Re-run halves of a failing batch until each failure is pinned on single requests.

    One culprit among n costs 2·log2(n) extra calls (12 for 64). The budget allows for about two culprits; past
    it the undecided requests fail with the error of the sub-batch they were in, as without isolation. Bisecting
    assumes the model is deterministic; a flaky model just shows up as more innocents succeeding.
    """
    budget = 4 * max(1, math.ceil(math.log2(size)))
    results: list[Any] = [error] * size
    half = size // 2
    pending: deque[list[int]] = deque([list(range(half)), list(range(half, size))])
    calls = culprits = 0
    exhausted = False
    while pending:
        idx = pending.popleft()
        if calls >= budget:
            exhausted = True
            continue  # results[idx] already hold the error of the batch they were in
        calls += 1
        sub = {name: [values[i] for i in idx] for name, values in kwargs.items()}
        try:
            for i, result in zip(idx, split(run_batch(**sub), len(idx)), strict=True):
                results[i] = result
        except BatchResultError as exc:
            for i in idx:
                results[i] = exc
        except Exception as exc:
            if len(idx) == 1:
                results[idx[0]] = exc
                culprits += 1
            else:
                for i in idx:
                    results[i] = exc
                mid = len(idx) // 2
                pending.extend([idx[:mid], idx[mid:]])
    logger.warning(
        "run_batch raised %s on a batch of %d; bisected with %d extra call(s): %d request(s) failing on their own%s",
        type(error).__name__, size, calls, culprits, ", budget spent before isolating all" if exhausted else "",
    )
    return results
