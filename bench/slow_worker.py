"""The example app for `python -m bench.web`'s overload run: `celery -A bench.slow_worker worker`.

The same app and task (`tasks.predict`, same queue), whose batches also wait `SLOW_BATCH_MS` (default 20 ms)
without using the CPU, as a host waits for an accelerator. The overload run needs the worker, not the web
process, to be the bottleneck; the example model alone drains faster than one uvicorn process answers on a
two-core machine, and slowing it with CPU work would take that CPU from the web process being measured.
"""

from __future__ import annotations

import os
import time
from typing import Any

from batching.model import ModelHandle
from tasks import app, predict

__all__ = ["app"]

_WAIT_S = float(os.environ.get("SLOW_BATCH_MS", "20")) / 1000
_run = predict.batching_model.run_batch()


def _slowed(**lists: Any) -> Any:
    time.sleep(_WAIT_S)
    return _run(**lists)


predict.batching_model = ModelHandle(fn=_slowed)
