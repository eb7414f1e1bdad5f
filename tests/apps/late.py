"""A project whose app is created after its task module was imported (Django: tasks.py before celery.py's app)."""

from __future__ import annotations

import os

from celery import Celery

import tests.apps.sharedtasks  # noqa: F401  (imported first, on purpose: no app exists yet)

URL = os.environ["REDIS_URL"]
app = Celery("late", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
