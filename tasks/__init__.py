"""The example Celery app: a batched text-scoring task beside an ordinary one.

Run a worker with ``celery -A tasks worker`` (or ``python worker.py``); call ``predict.delay(text="...")``.
"""

from __future__ import annotations

import functools
import os

from celery import Celery

from batching import batched

from .model import SentimentModel

app = Celery(
    "tasks",
    broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
)
app.conf.update(
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)


@functools.cache
def _model() -> SentimentModel:
    return SentimentModel()


@batched(app, batch_size=64, max_delay=0.0)
def predict(text: list[str], scale: list[float] = 1.0) -> list[float]:  # type: ignore[assignment]
    """Probability that each text is positive, times its ``scale``: one forward pass per batch."""
    return _model().run_batch(text, scale)


#: The model-object form: parameters from ``SentimentModel.run``, one model per worker process, built lazily.
sentiment = batched(app, model=SentimentModel, name="tasks.sentiment", batch_size=64, max_delay=0.002)


@app.task
def add(x: int, y: int) -> int:
    """An ordinary task, served by the same worker's normal consumer."""
    return x + y
