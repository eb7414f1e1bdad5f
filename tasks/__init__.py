"""The example Celery app: a batched text-scoring task beside an ordinary one.

Run a worker with ``celery -A tasks worker`` (or ``python worker.py``); call ``predict.delay(text="...")``.
"""

from __future__ import annotations

import functools
import os

from celery import Celery

from batching import batched

from .model import SentimentModel

app = Celery("tasks")
# A module path, so settings (and REDIS_URL) are read on first use: an entry point such as tasks.demo can choose
# the Redis before anything connects.
app.config_from_object("tasks.celeryconfig")


@functools.cache
def _model() -> SentimentModel:
    return SentimentModel()


#: Requests that may wait in predict's queue: past it, sends raise QueueFull and the web app answers 429, rather than
#: piling work into Redis until its memory runs out. Read once, at import, like REDIS_URL.
MAX_QUEUE_SIZE = int(os.environ.get("PREDICT_MAX_QUEUE_SIZE", "10000"))
#: Requests per batch (a worker setting; python -m bench.web lowers it to make the worker the bottleneck).
BATCH_SIZE = int(os.environ.get("PREDICT_BATCH_SIZE", "64"))


@batched(app, batch_size=BATCH_SIZE, max_delay=0.0, max_queue_size=MAX_QUEUE_SIZE)
def predict(text: list[str], scale: list[float] = 1.0) -> list[float]:  # type: ignore[assignment]
    """Probability that each text is positive, times its ``scale``: one forward pass per batch."""
    return _model().run_batch(text, scale)


#: The model-object form: parameters from ``SentimentModel.run``, one model per worker process, built lazily.
sentiment = batched(app, model=SentimentModel, name="tasks.sentiment", batch_size=64, max_delay=0.002)


@app.task
def add(x: int, y: int) -> int:
    """An ordinary task, served by the same worker's normal consumer."""
    return x + y
