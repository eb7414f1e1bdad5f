"""HTTP front for the example app: each ``POST /predict`` sends one request and awaits its result on the event loop.

Run with ``uvicorn tasks.web:app``. Built on ``batching.aio``: no thread per waiting request and no cap on requests in
flight but the task's ``max_queue_size`` — every waiting request shares one Redis subscription, so a single web
process can hold thousands, and they all reach the worker together, which is what fills its batches.

Status codes: 200 with ``{"task_id", "result"}``; 422 for a body that does not validate (nothing is sent); 429 with
``Retry-After`` when the task's queue is full (nothing is sent); 502 when the task failed on the worker, with its
error; 504 when no result came within the timeout, with the ``task_id``. A request that times out, or whose client
disconnects (answered 499, which nobody reads), is abandoned: if no worker has taken it yet, it never runs.
``GET /healthz`` is 503 while Redis does not answer a ping.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's body type from its annotation, and in
# create_app that annotation is a local variable, which a string annotation could not be resolved to.

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from celery import Task, states
from celery.exceptions import TaskRevokedError
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

import batching.aio
from batching import QueueFull

from . import predict

#: Seconds a request waits for its task's result before the answer is 504.
DEFAULT_TIMEOUT_S = 30.0
#: Seconds /healthz waits for Redis to connect and answer.
HEALTH_TIMEOUT_S = 2.0


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    scale: float = 1.0


class TaskResponse(BaseModel):
    task_id: str
    result: Any


def create_app(task: Task, request_model: type[BaseModel] = PredictRequest, *,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> FastAPI:
    """A web app whose ``POST /predict`` validates its body with ``request_model`` and calls ``task`` with it."""

    @asynccontextmanager
    async def lifespan(web: FastAPI) -> AsyncIterator[None]:
        async with health_redis(web, task):
            try:
                yield
            finally:
                await batching.aio.close()

    web = FastAPI(title="celery-batching example", lifespan=lifespan)

    @web.post("/predict", response_model=TaskResponse)
    async def predict_route(body: request_model, request: Request) -> Any:  # type: ignore[valid-type]
        try:
            result = await batching.aio.submit(task, **body.model_dump())  # type: ignore[attr-defined]
        except QueueFull as exc:
            raise HTTPException(429, {"error": str(exc), "depth": exc.depth},
                                headers={"Retry-After": str(max(1, math.ceil(min(exc.retry_after, 3600))))}) from None
        waiting = asyncio.ensure_future(batching.aio.wait(result, timeout=timeout_s, propagate=False))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not waiting.done():
            # The client went away: cancelling the wait abandons the request, so it never reaches the model if no
            # worker has taken it yet. Nobody reads this answer.
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            return Response(status_code=499)
        try:
            value = waiting.result()
        except TimeoutError:
            raise HTTPException(504, {"task_id": result.id, "error": f"no result within {timeout_s:g}s"}) from None
        if isinstance(value, BaseException):
            state = states.REVOKED if isinstance(value, TaskRevokedError) else states.FAILURE
            raise HTTPException(502, {"task_id": result.id, "state": state, "error": describe(value)})
        return TaskResponse(task_id=result.id, result=value)

    add_healthz(web)
    return web


@asynccontextmanager
async def health_redis(web: FastAPI, task: Task) -> AsyncIterator[None]:
    """Holds ``web.state.redis``, the connection ``/healthz`` pings, for the app's lifetime."""
    web.state.redis = redis.asyncio.Redis.from_url(
        task.app.conf.broker_url, socket_connect_timeout=HEALTH_TIMEOUT_S, socket_timeout=HEALTH_TIMEOUT_S
    )
    try:
        yield
    finally:
        await web.state.redis.aclose()


def add_healthz(web: FastAPI) -> None:
    """``GET /healthz``: 200 while the app's Redis (``web.state.redis``) answers, else 503 saying why."""

    @web.get("/healthz")
    async def healthz(request: Request) -> dict[str, str]:
        try:
            await request.app.state.redis.ping()
        except (RedisError, OSError) as exc:
            raise HTTPException(503, {"redis": describe(exc)}) from exc
        return {"status": "ok"}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def describe(exc: Any) -> str:
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)


app = create_app(predict)
