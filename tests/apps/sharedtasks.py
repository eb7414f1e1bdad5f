"""Batched tasks defined without an app, as a Django project's tasks.py defines @shared_task tasks."""

from __future__ import annotations

import os

import redis

from batching import shared_batched


@shared_batched(batch_size=8, max_delay=0.2)
def shout(text):
    redis.Redis.from_url(os.environ["REDIS_URL"]).rpush("shared:sizes", len(text))
    return [t.upper() for t in text]


class Doubler:
    def run(self, x):
        return self.run_batch([x])[0]

    def run_batch(self, x):
        return [v * 2 for v in x]


double = shared_batched(model=Doubler, name="shared.double", batch_size=8)
