"""A client or peer worker that shares the broker and backend but never imported any batched task."""

from __future__ import annotations

import os

from celery import Celery

URL = os.environ["REDIS_URL"]
app = Celery("slim", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True,
                beat_schedule={"echo-by-name": {"task": "ctl.echo", "schedule": 0.2, "kwargs": {"x": "from-beat"}}})
