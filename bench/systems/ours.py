"""(c) This project: `batching.batched`, each parameter arriving as a list, one result per request."""

from __future__ import annotations

from typing import Any

from batching import batched
from bench.config import AppSettings
from bench.models import get_model, recording
from bench.systems import make_app

settings = AppSettings.from_env()
app = make_app("bench-ours", settings)
model = get_model(settings.model)
if settings.record:
    model = recording(model, settings.redis_url)
if settings.otel:
    from bench.tracing import instrument_worker

    instrument_worker()


@batched(app, batch_size=settings.batch_size, max_delay=settings.max_delay_s, name="bench.ours.predict",
         instances=settings.instances, coalesce=settings.coalesce)
def predict(x: list[Any]) -> list[Any]:
    return model(x)
