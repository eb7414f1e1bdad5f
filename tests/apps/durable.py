"""A durable batched task (``wait_replicas=1``) on a replicated Redis: plain (``BROKER_URL``) or through Sentinel.

Every batch appends its inputs to ``RUNS_LOG``, one line each, so a test counts what ran and what ran twice
without asking Redis (which a failover may be busy replacing).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from batching import batched

URL = os.environ["BROKER_URL"]
app = Celery("durable", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
if URL.startswith("sentinel://"):
    app.conf.broker_transport_options = {"master_name": "mymaster"}
    app.conf.result_backend_transport_options = {"master_name": "mymaster"}


@batched(app, batch_size=16, lease_s=3, wait_replicas=int(os.environ.get("WAIT_REPLICAS", "1")), wait_timeout=0.3,
         name="durable.double", shared=False)  # re-imported per test: never offered to other apps
def double(x):
    with open(os.environ["RUNS_LOG"], "a") as log:
        log.write("".join(f"{v}\n" for v in x))
    time.sleep(0.005)
    return [v * 2 for v in x]
