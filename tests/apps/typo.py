"""An app with a misspelt ``batching_*`` setting: its worker must refuse to start, naming it."""

import os

from celery import Celery

from batching import batched

app = Celery("typo", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
app.conf.batching_metric_port = 9808  # sic: batching_metrics_port


@batched(app, batch_size=8, name="typo.echo")
def echo(x):
    return x
