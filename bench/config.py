"""What a worker or client subprocess must run, carried in environment variables.

`celery -A module worker` offers no way to hand parameters to the app module, so the harness writes them into
the child's environment and the app modules read them back here, in this one place, when they are imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The systems under test, in table order.
SYSTEMS = ("plain", "batches", "ours")

_URL = "BENCH_REDIS_URL"
_MODEL = "BENCH_MODEL"
_BATCH_SIZE = "BENCH_BATCH_SIZE"
_MAX_DELAY_S = "BENCH_MAX_DELAY_S"
# Optional: the soak and scale-out benchmarks set them, the side-by-side harness leaves Celery's defaults.
_RESULT_EXPIRES_S = "BENCH_RESULT_EXPIRES_S"
_RESULT_EXTENDED = "BENCH_RESULT_EXTENDED"
_RECORD = "BENCH_RECORD"
_COALESCE = "BENCH_COALESCE"
#: Set to 1 (in the environment of `python -m bench`) to run ours' worker instrumented with OpenTelemetry.
_OTEL = "BENCH_OTEL"
#: Ours' `instances`: model instance processes per worker.
_INSTANCES = "BENCH_INSTANCES"
#: The mix benchmark (`bench.mix`): which batching its worker runs, and the padded word budget of a batch.
MIX_MODE_ENV, MIX_BUDGET_ENV = "BENCH_MIX_MODE", "BENCH_MIX_BUDGET"
MIX_MODES = ("fifo", "budget", "bucket")
#: Hash of counters the mix worker's model keeps: items, batches, real tokens, padded tokens.
MIX_TOKENS = "bench:mix:tokens"


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    redis_url: str
    model: str
    batch_size: int
    #: How long a batcher may hold the oldest request waiting for more, in seconds.
    max_delay_s: float
    #: Celery's `result_expires`, in seconds; None keeps Celery's default (one day).
    result_expires_s: int | None = None
    #: Celery's `result_extended`: metas also carry name, args, kwargs and the worker's hostname.
    result_extended: bool = False
    #: Wrap ours' model in `bench.models.recording`: every input it ran is counted in Redis.
    record: bool = False
    #: ours' `coalesce=True`: identical requests in flight at once run once (`python -m bench.coalesce`).
    coalesce: bool = False
    #: Instrument ours' worker with opentelemetry-instrumentation-celery (spans made, then dropped unexported).
    otel: bool = False
    #: Ours' `instances=N`: model instances per worker, each in its own process (1: in the worker's process).
    instances: int = 1

    @classmethod
    def from_env(cls) -> AppSettings:
        missing = [k for k in (_URL, _MODEL, _BATCH_SIZE, _MAX_DELAY_S) if k not in os.environ]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not set: bench app modules are started by `python -m bench`")
        return cls(
            redis_url=os.environ[_URL],
            model=os.environ[_MODEL],
            batch_size=int(os.environ[_BATCH_SIZE]),
            max_delay_s=float(os.environ[_MAX_DELAY_S]),
            result_expires_s=int(os.environ[_RESULT_EXPIRES_S]) if os.environ.get(_RESULT_EXPIRES_S) else None,
            result_extended=os.environ.get(_RESULT_EXTENDED) == "1",
            record=os.environ.get(_RECORD) == "1",
            coalesce=os.environ.get(_COALESCE) == "1",
            otel=os.environ.get(_OTEL) == "1",
            instances=int(os.environ.get(_INSTANCES) or 1),
        )

    def to_env(self) -> dict[str, str]:
        return {
            _URL: self.redis_url,
            _MODEL: self.model,
            _BATCH_SIZE: str(self.batch_size),
            _MAX_DELAY_S: repr(self.max_delay_s),
            _RESULT_EXPIRES_S: "" if self.result_expires_s is None else str(self.result_expires_s),
            _RESULT_EXTENDED: "1" if self.result_extended else "0",
            _RECORD: "1" if self.record else "0",
            _COALESCE: "1" if self.coalesce else "0",
            _OTEL: os.environ.get(_OTEL, "0"),
            _INSTANCES: str(self.instances),
        }
