"""Batch queues in the app's own queue set and routes, so Celery's tools see them as any task queue.

``@batched`` registers each task's queue here. Every queue set the app builds (``app.amqp.queues``: what
``celery purge`` empties, whatever it loaded of the app) holds the batch queues, added after the set of queues a
normal consumer takes messages from was fixed (the worker's bootstep deselects them anyway). Once the configuration
is loaded, a router is appended to the user's own ``task_routes``: ``send_task("<name>")`` of a batched task, from
any client that imported it, goes to its batch queue. A client that never imported the task is covered on the
worker's side: a batched task's message that arrives on a normal queue is forwarded to its batch queue
(``worker/forward.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

#: app -> {task name: batch queue}. Weak: an app that goes away takes its entries with it.
_QUEUES: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def register(app: Any, task_name: str, queue: str) -> None:
    """Make ``queue`` part of ``app``'s queue set and route ``task_name`` to it."""
    first = app not in _QUEUES
    _QUEUES.setdefault(app, {})[task_name] = queue
    if first:
        _declare_in_every_queue_set(app)
        app.on_after_configure.connect(_route, weak=False)
        if app.configured:
            _route(app)
    amqp = app.amqp
    if "queues" in vars(amqp):  # already built: add this one now
        _add_queues(amqp.queues, [queue])


def batch_queues(app: Any) -> dict[str, str]:
    """The batch queues registered on ``app``, by task name."""
    return dict(_QUEUES.get(app, {}))


def _declare_in_every_queue_set(app: Any) -> None:
    """Wrap the app's ``amqp.Queues`` (the factory of ``app.amqp.queues``): every queue set it builds, whenever
    that is — ``celery purge`` builds it without finalising the app or importing its modules — also holds the batch
    queues, added after ``Queues`` fixed the set a normal consumer consumes from."""
    amqp = app.amqp
    build = amqp.Queues

    def queues_with_batch_queues(*args: Any, **kwargs: Any) -> Any:
        queues = build(*args, **kwargs)
        _add_queues(queues, _QUEUES.get(app, {}).values())
        return queues

    amqp.Queues = queues_with_batch_queues


def _add_queues(queues: Any, names: Iterable[str]) -> None:
    for name in names:
        if name not in queues:
            queues.add(queues.new_missing(name))


def _route(sender: Any = None, **kwargs: Any) -> None:
    """Append our router to ``task_routes`` once the configuration is loaded (the user's routes come first);
    Celery rebuilds its routing table when that setting changes."""
    conf = sender.conf
    routes = conf.task_routes
    entries = list(routes) if isinstance(routes, (list, tuple)) else [] if routes is None else [routes]
    if not any(isinstance(r, _BatchRouter) for r in entries):
        conf.task_routes = [*entries, _BatchRouter(_QUEUES[sender])]


class _BatchRouter:
    """A Celery router (``task_routes`` entry): a batched task's name -> its batch queue."""

    def __init__(self, queues: dict[str, str]) -> None:
        self.queues = queues  # the app's own entry of _QUEUES: tasks defined later are routed too

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, options: Any = None, task: Any = None,
                 **kw: Any) -> dict[str, str] | None:
        queue = self.queues.get(name)
        return {"queue": queue} if queue else None

    def __repr__(self) -> str:
        return "<batching router: batched tasks to their batch queues>"
