"""The app ``tests/test_cli.py`` inspects with the ``batching`` command; no worker ever serves it."""

from __future__ import annotations

import os

from celery import Celery

from batching import batched

URL = os.environ["REDIS_URL"]
app = Celery("cliapp", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


@batched(app, batch_size=8, max_delay=0.0)
def embed(text):
    return [len(t) for t in text]


@batched(app, batch_size=4, max_delay=0.0, lease_s=5.0)
def score(x):
    return [v * 2 for v in x]
