"""(b) celery-batches 0.11, configured as its documentation asks; runs only under the peers' virtualenv."""

from __future__ import annotations

from celery_batches import Batches, SimpleRequest

from bench.config import AppSettings
from bench.models import get_model
from bench.systems import make_app

settings = AppSettings.from_env()
app = make_app("bench-batches", settings)
model = get_model(settings.model)

# celery-batches buffers *unacked* messages, so a batch can never outgrow the prefetch window
# (concurrency x multiplier, celery-batches #17). Its docs ask for a window of at least `flush_every`;
# with the solo pool (concurrency 1) that makes the multiplier the batch size. The default (4) would cap every
# batch at 4 and turn the comparison into a measurement of a misconfiguration.
app.conf.worker_prefetch_multiplier = settings.batch_size

# kombu's call_repeatedly(0, ...) re-arms itself immediately and spins the worker's event loop, so a zero
# max_delay is given to celery-batches as 1 ms, the smallest interval that behaves.
_FLUSH_INTERVAL_S = max(settings.max_delay_s, 0.001)


@app.task(
    base=Batches,
    name="bench.batches.predict",
    flush_every=settings.batch_size,
    flush_interval=_FLUSH_INTERVAL_S,
)
def predict(requests: list[SimpleRequest]) -> None:
    outputs = model([request.kwargs["x"] for request in requests])
    # celery-batches stores nothing by itself: results are written one by one, as its README shows.
    for request, output in zip(requests, outputs, strict=True):
        app.backend.mark_as_done(request.id, output, request=request)
