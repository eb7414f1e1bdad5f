"""One Celery app module per system under test; each defines `app` and a task `predict` taking keyword `x`.

These modules run inside worker and client subprocesses (`celery -A bench.systems.<name> worker`), possibly
under the peers' virtualenv, so they import nothing from the harness beyond `bench.config` and `bench.models`.
"""

from __future__ import annotations

from celery import Celery

from bench.config import AppSettings


def make_app(name: str, settings: AppSettings) -> Celery:
    app = Celery(name, broker=settings.redis_url, backend=settings.redis_url)
    # Silences Celery's start-up deprecation warning; the private redis-server is up before any worker starts.
    app.conf.broker_connection_retry_on_startup = True
    if settings.result_expires_s is not None:
        app.conf.result_expires = settings.result_expires_s
    app.conf.result_extended = settings.result_extended
    return app
