"""Settings of the example app, read when the app first needs them (not when ``tasks`` is imported).

``REDIS_URL`` (default ``redis://localhost:6379/0``) is both broker and result backend.
"""

import os

broker_url = result_backend = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
result_expires = 3600
broker_connection_retry_on_startup = True
#: tasks.embed (the real model) lives in its own module; its model and torch load lazily, in workers only.
include = ["tasks.embeddings"]
