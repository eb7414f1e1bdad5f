"""The example web app as it was before batching.aio, kept for ``python -m bench.web`` to compare with: each ``POST
/predict`` is one ``predict.delay(...)`` awaited in a thread (at most 64 at once per process).

Run with ``uvicorn bench.threaded_web:app``. The result is awaited in a thread, so the event loop keeps taking
requests while earlier ones wait, and concurrent requests reach the worker together, which is what lets it batch
them.

Status codes: 200 with ``{"task_id", "result"}``; 422 for a body that does not validate (nothing is sent);
502 when the task failed on the worker, with its error; 504 when no result came within the timeout, with the
``task_id`` (the task may still run); ``GET /healthz`` is 503 while Redis does not answer a ping.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's body type from its annotation, and in
# create_app that annotation is a local variable, which a string annotation could not be resolved to.

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from celery import Task, states
from celery.exceptions import TimeoutError as ResultTimeoutError
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from tasks import predict
from tasks.web import DEFAULT_TIMEOUT_S, PredictRequest, TaskResponse, add_healthz, describe, health_redis

#: Requests waiting for results at once, per web process. Each holds a thread with its own Redis result
#: subscription; more requests queue for a thread. Keep it at least the task's batch_size, or batches stay small.
DEFAULT_MAX_IN_FLIGHT = 64


def create_app(
    task: Task,
    request_model: type[BaseModel] = PredictRequest,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> FastAPI:
    """A web app whose ``POST /predict`` validates its body with ``request_model`` and calls ``task`` with it."""

    @asynccontextmanager
    async def lifespan(web: FastAPI) -> AsyncIterator[None]:
        web.state.threads = anyio.CapacityLimiter(max_in_flight)
        async with health_redis(web, task):
            yield

    web = FastAPI(title="celery-batching example", lifespan=lifespan)

    @web.post("/predict", response_model=TaskResponse)
    async def predict_route(body: request_model, request: Request) -> TaskResponse:  # type: ignore[valid-type]
        call = functools.partial(_call, task, body.model_dump(), timeout_s)  # type: ignore[attr-defined]
        task_id, state, value = await anyio.to_thread.run_sync(call, limiter=request.app.state.threads)
        if state == states.SUCCESS:
            return TaskResponse(task_id=task_id, result=value)
        if state is None:
            raise HTTPException(504, {"task_id": task_id, "error": f"no result within {timeout_s:g}s"})
        raise HTTPException(502, {"task_id": task_id, "state": state, "error": describe(value)})

    add_healthz(web)
    return web


def _call(task: Task, kwargs: dict[str, Any], timeout_s: float) -> tuple[str, str | None, Any]:
    """Send and wait, in one thread: Celery's Redis result consumer belongs to the thread that made the result.

    Returns ``(task_id, state, value)``, with state ``None`` on timeout and the exception as value on failure.
    """
    result = task.delay(**kwargs)
    try:
        value = result.get(timeout=timeout_s, propagate=False)
    except ResultTimeoutError:
        # Unsubscribe now, from the thread that subscribed; left to AsyncResult.__del__, it would happen whenever
        # the garbage collector runs, from any thread, on a connection this thread's backend may no longer hold.
        result.backend.remove_pending_result(result)
        return result.id, None, None
    return result.id, result.state, value


app = create_app(predict)
