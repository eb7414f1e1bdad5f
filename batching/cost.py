"""What a request costs and what a batch may: ``@batched(..., cost=fn, max_batch_cost=K, padded=..., bucket=...)``.

The client computes each request's cost when it sends it (``.delay``, ``apply_async``, ``submit_many``,
``batching.aio.submit``) and carries it in the message header ``COST_HEADER``, so the consumer packs batches by
reading the envelope's headers, never the body; a request that could never fit fails there, before anything is
sent. A message sent by name carries no such header: the consumer computes its cost when it decodes it, and fails
it (never re-queues it) when the cost is unusable or too large.

Two ways to add up a batch: the sum of its items' costs (the default), or, with ``padded=True``, its longest item
times its count — what a padded model (a transformer over the longest text of its batch) really pays, TEI's
``max_len x n``. Nothing here does I/O.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, CostError, CostTooLarge
from .merge import CallSpec

#: The message header holding a request's cost, as computed by the client.
COST_HEADER = "batching_cost"


@dataclass(frozen=True)
class CostSpec:
    """A task's cost function and budget, checked once when the task is defined."""

    #: The task's name, for error messages.
    task: str
    fn: Callable[..., Any]
    #: The task's per-request parameters: their defaults are applied before ``fn`` sees them.
    spec: CallSpec
    #: Most a batch may cost (None: no budget; the cost then only groups requests when bucketing).
    max_batch_cost: float | None = None
    #: A batch costs its longest item times its count, not the sum of its items.
    padded: bool = False
    #: Form each batch from a window of the oldest waiting requests, grouping similar costs.
    bucket: bool = False
    #: The names ``fn`` takes (None: all of them, it takes ``**kwargs``).
    names: frozenset[str] | None = None

    @classmethod
    def build(
        cls, task: str, fn: Any, spec: CallSpec, *, max_batch_cost: Any = None, padded: Any = False,
        bucket: Any = False, max_delay_s: float = 0.0,
    ) -> CostSpec | None:
        """The checked settings, or None for a task without ``cost=``; raises ``ConfigurationError`` naming what
        cannot work."""
        for flag, value in (("padded", padded), ("bucket", bucket)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag} must be True or False, got {value!r}")
        if fn is None:
            extra = [name for name, given in (("max_batch_cost", max_batch_cost is not None), ("padded", padded),
                                              ("bucket", bucket)) if given]
            if extra:
                raise ConfigurationError(
                    f"{', '.join(extra)} need(s) cost=: a function of one request's arguments that returns its "
                    "cost, e.g. cost=lambda text: len(text.split())"
                )
            return None
        if not callable(fn):
            raise ConfigurationError(f"cost must be a function of one request's arguments, got {fn!r}")
        if max_batch_cost is not None and not (
            isinstance(max_batch_cost, (int, float)) and not isinstance(max_batch_cost, bool)
            and math.isfinite(max_batch_cost) and max_batch_cost > 0
        ):
            raise ConfigurationError(f"max_batch_cost must be a positive number or None, got {max_batch_cost!r}")
        if bucket and not max_delay_s > 0:
            raise ConfigurationError(
                "bucket=True regroups requests within max_delay (the longest any request is held back for a better "
                "batch): give max_delay > 0, e.g. max_delay=0.05"
            )
        return cls(task, fn, spec, None if max_batch_cost is None else float(max_batch_cost), padded, bucket,
                   _parameters(fn, spec))

    def of(self, bound: Mapping[str, Any]) -> float:
        """The cost of one request whose arguments are ``bound`` (by name, defaults not yet applied).

        Raises ``CostError`` if ``fn`` raises or returns no finite number >= 0, and ``CostTooLarge`` if the cost
        is over ``max_batch_cost``.
        """
        arguments = {**self.spec.defaults, **bound}
        if self.names is not None:
            arguments = {name: value for name, value in arguments.items() if name in self.names}
        try:
            value = self.fn(**arguments)
        except Exception as exc:
            raise CostError(f"{self.task}: the cost function raised {type(exc).__name__}: {exc}") from exc
        return self.check(value)

    def check(self, value: Any) -> float:
        """``value`` as a usable cost (a finite number >= 0, within ``max_batch_cost``), or ``CostError``."""
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError  # float() would take them, but they are not numbers
            # numpy's and torch's numbers too: whatever has __index__ or __float__
            number = float(value.__index__()) if hasattr(value, "__index__") else float(value.__float__())
        except Exception:
            raise CostError(
                f"{self.task}: the cost function must return a number, got {type(value).__name__} {value!r:.80}"
            ) from None
        if not math.isfinite(number) or number < 0:
            raise CostError(f"{self.task}: a cost must be a finite number >= 0, got {number!r}")
        if self.max_batch_cost is not None and number > self.max_batch_cost:
            raise CostTooLarge(
                f"{self.task}: this request costs {number:g}, more than max_batch_cost={self.max_batch_cost:g}: no "
                "batch could ever hold it. Split the input, or raise max_batch_cost",
                cost=number, limit=self.max_batch_cost,
            )
        return number

    def tally(self) -> Tally:
        """An empty batch's running cost."""
        return Tally(self.max_batch_cost, self.padded)

    def total(self, costs: list[float]) -> float:
        """What a batch of items of ``costs`` costs."""
        if not costs:
            return 0.0
        return max(costs) * len(costs) if self.padded else math.fsum(costs)


class Tally:
    """The running cost of a forming batch: does one more item fit the budget?"""

    __slots__ = ("count", "limit", "longest", "padded", "total")

    def __init__(self, limit: float | None, padded: bool) -> None:
        self.limit = limit
        self.padded = padded
        self.count = 0
        self.total = 0.0
        self.longest = 0.0

    def fits(self, cost: float) -> bool:
        if self.limit is None:
            return True
        if self.padded:
            return max(self.longest, cost) * (self.count + 1) <= self.limit
        return self.total + cost <= self.limit

    def add(self, cost: float) -> None:
        self.count += 1
        self.total += cost
        self.longest = max(self.longest, cost)


def _parameters(fn: Callable[..., Any], spec: CallSpec) -> frozenset[str] | None:
    """The task parameters ``fn`` is called with: those it names (all, if it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of the cost function {fn!r}: {exc}") from exc
    names: set[str] = set()
    for param in sig.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            return None
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
            raise ConfigurationError(
                f"the cost function {fn!r} takes {param.name} positionally only: it is called with the request's "
                "arguments by name"
            )
        if param.name not in spec.names and not spec.accepts_any_keyword:
            if param.default is not param.empty:
                continue  # never passed: it keeps its own default
            raise ConfigurationError(
                f"the cost function {fn!r} takes {param.name!r}, which is not a parameter of the task "
                f"({', '.join(spec.names)})"
            )
        names.add(param.name)
    return frozenset(names)
