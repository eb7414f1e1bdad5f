"""The usual workaround, for ``python -m bench.web`` to compare with: ``predict.delay()`` then
``await asyncio.to_thread(result.get)``. Each waiting request holds a thread of asyncio's default executor (a few
per core), and Celery's result consumer is shared by those threads (celery#4480).

Run with ``uvicorn bench.tothread_web:app``. Same routes and status codes as ``tasks.web`` (without 429).
"""

# No ``from __future__ import annotations``: FastAPI reads the route's body type from its annotation.

import asyncio
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeoutError
from fastapi import FastAPI, HTTPException

from tasks import predict
from tasks.web import DEFAULT_TIMEOUT_S, PredictRequest, TaskResponse

app = FastAPI(title="celery-batching example, asyncio.to_thread(result.get)")


@app.post("/predict", response_model=TaskResponse)
async def predict_route(body: PredictRequest) -> Any:
    result = predict.delay(**body.model_dump())
    try:
        value = await asyncio.to_thread(result.get, timeout=DEFAULT_TIMEOUT_S, propagate=False)
    except ResultTimeoutError:
        raise HTTPException(504, {"task_id": result.id, "error": "timeout"}) from None
    if isinstance(value, BaseException):
        raise HTTPException(502, {"task_id": result.id, "error": f"{type(value).__name__}: {value}"})
    return TaskResponse(task_id=result.id, result=value)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
