"""An app whose broker is reached through Redis Sentinel (``SENTINEL_URL``, master ``mymaster``)."""

import os

from celery import Celery

from batching import batched

app = Celery("sentinel_app", broker=os.environ["SENTINEL_URL"], backend=os.environ["REDIS_URL"])
app.conf.broker_transport_options = {"master_name": "mymaster"}
app.conf.broker_connection_retry_on_startup = True


@batched(app, batch_size=8, name="sentinel_app.triple")
def triple(x):
    return [v * 3 for v in x]
