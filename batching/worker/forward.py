"""A batched task's message that reaches a normal queue goes on to its batch queue, never into a pool process.

``BatchedTask.Strategy`` names ``forward``: Celery builds one strategy per registered task in the worker's normal
consumer and calls it for every message of that task it receives. A batched task's message lands there when it was
sent without its route — ``send_task("shop.predict")`` from a client that never imported the task, beat from a slim
app. Run there it would go to a pool process one item at a time (and build the model in that process); instead it
is re-published as it is (body, headers, properties: same id, ETA, priority, links) to the task's batch queue, and
only then acknowledged, so a crash in between duplicates it rather than losing it.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def forward(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery task strategy: re-publish the message to ``task``'s batch queue, then ack it."""
    queue = task.batching.queue
    errors = consumer.connection_errors
    warned: set[str] = set()

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any = None, **kw: Any) -> None:
        source = (message.delivery_info or {}).get("routing_key") or "?"
        try:
            props = message.properties
            with app.producer_or_acquire() as producer:
                producer.publish(
                    message.body, exchange="", routing_key=queue, content_type=message.content_type,
                    content_encoding=message.content_encoding, headers=dict(message.headers),
                    correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
                    priority=props.get("priority"), delivery_mode=props.get("delivery_mode"), retry=True,
                )
        except Exception:
            logger.exception("batching %s: could not forward a message to its batch queue %r; it stays queued",
                             task.name, queue)
            reject(logger, errors, True)  # as Celery's Request acks and rejects
            return
        ack(logger, errors)
        if source not in warned:  # once per source queue: loud enough to notice, not a line per message
            warned.add(source)
            logger.warning(
                "batching %s: a message arrived on queue %r, not on the batch queue %r; forwarded it there. "
                "Clients that send this task by name without importing it go through this extra hop: route it "
                "with task_routes={%r: {'queue': %r}} or import the task module in the client.",
                task.name, source, queue, task.name, queue,
            )

    return handle
