"""An app with a task made with base=BatchedTask but without @batched: refused, naming the fix."""

from __future__ import annotations

import os

from celery import Celery

from batching import BatchedTask

app = Celery("misbased", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])


@app.task(base=BatchedTask, shared=False)
def predict(text):
    return text
