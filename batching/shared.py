"""``shared_batched``: ``@batched`` without an app at hand, bound to the current app at use — Celery's
``@shared_task`` for batched tasks, for Django projects and reusable apps.

Built on Celery's own machinery for ``shared_task``: every app finalised from now on (and every app already
finalised) gets its own batched task through ``batched(app, ...)`` — which also registers the worker step and the
batch queue on that app — and the returned proxy resolves to the current app's task whenever it is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery import _state
from celery.local import Proxy

from .settings import check_task_options
from .task import _check_rate_limit, _model_class, batched


def shared_batched(fn: Callable[..., Any] | None = None, *, model: Callable[[], Any] | None = None,
                   name: str | None = None, **options: Any) -> Any:
    """``@shared_batched(batch_size=32, max_delay=0.01)`` over a batch function, or
    ``shared_batched(model=SentimentModel, name="shop.sentiment")``: as ``batched`` without the app argument.

    Options are checked now, where the task is defined; the task itself is created on each app when it is
    finalised, like ``@shared_task``'s.
    """
    check_task_options(options)
    _check_rate_limit(options.get("rate_limit"))
    if fn is None and model is None:
        return functools.partial(shared_batched, name=name, **options)
    target = fn if fn is not None else _model_class(model)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"model": model} if model is not None else {}

    def define(app: Any) -> Any:
        task_name = name or app.gen_task_name(target.__name__, target.__module__)
        if task_name in app.tasks:  # defined on this app already (finalised before and after, say)
            return app.tasks[task_name]
        # shared=False: this callback, not Celery's, defines it on later apps, with the worker step and routes.
        return batched(app, fn, name=name, **kwargs, **{"shared": False, **options})

    _state.connect_on_app_finalize(define)
    for app in _state._get_active_apps():
        if app.finalized:
            with app._finalize_mutex:
                define(app)

    def current() -> Any:
        app = _state.get_current_app()
        return app.tasks[name or app.gen_task_name(target.__name__, target.__module__)]

    return Proxy(current)
