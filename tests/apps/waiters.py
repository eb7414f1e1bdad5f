"""A batched task no other test's worker serves: the many-waiters test subscribes before any worker starts."""

from __future__ import annotations

import os

from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("waiters", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


@batched(app, batch_size=64, max_delay=0.0)
def upper(text):
    return [t.upper() for t in text]
