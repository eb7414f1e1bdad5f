"""Side-by-side benchmark: plain Celery vs celery-batches vs this project, on one private redis-server.

Run it with ``python -m bench`` (``--help`` for the flags, ``--quick`` for a smoke run). The harness process
only orchestrates: every worker and every client is a subprocess, so that celery-batches can run from its own
virtualenv (it pins ``celery<5.7``) and all three systems are measured the same way.
"""
