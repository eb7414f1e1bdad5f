"""Start a worker for the example app: ``python worker.py [celery worker options]``.

The same as ``celery -A tasks worker``; the batching consumers start inside it. ``REDIS_URL`` picks the broker.
"""

import sys

from tasks import app

if __name__ == "__main__":
    app.worker_main(["worker", "--loglevel=INFO", *sys.argv[1:]])
