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


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    redis_url: str
    model: str
    batch_size: int
    #: How long a batcher may hold the oldest request waiting for more, in seconds.
    max_delay_s: float

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
        )

    def to_env(self) -> dict[str, str]:
        return {
            _URL: self.redis_url,
            _MODEL: self.model,
            _BATCH_SIZE: str(self.batch_size),
            _MAX_DELAY_S: repr(self.max_delay_s),
        }
