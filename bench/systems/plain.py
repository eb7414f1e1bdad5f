"""(a) Plain Celery: one task per item, the model called with a batch of one."""

from __future__ import annotations

from typing import Any

from bench.config import AppSettings
from bench.models import get_model
from bench.systems import make_app

settings = AppSettings.from_env()
app = make_app("bench-plain", settings)
model = get_model(settings.model)


@app.task(name="bench.plain.predict")
def predict(x: Any) -> Any:
    result = model([x])[0]
    # Celery's JSON encoder takes no numpy arrays (the embedding model returns them): the list a client gets.
    return result.tolist() if hasattr(result, "tolist") else result
