"""An app with a RabbitMQ broker URL: batched tasks must refuse to start on it, saying why."""

from celery import Celery

from batching import batched

app = Celery("amqp_app", broker="amqp://guest:guest@127.0.0.1:1//", backend="cache+memory://")


@batched(app, batch_size=8, name="amqp_app.noop")
def noop(x):
    return x
