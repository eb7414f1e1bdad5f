"""Side-by-side benchmark: plain Celery vs celery-batches vs this project, on one private redis-server.

Run it with ``python -m bench`` (``--help`` for the flags, ``--quick`` for a smoke run). The harness process
only orchestrates: every worker and every client is a subprocess, so that celery-batches can run from its own
virtualenv (it pins ``celery<5.7``) and all three systems are measured the same way. ``--models embed`` adds a
real model (all-MiniLM-L6-v2 on one CPU thread) and its in-process rate, the ceiling for ours. Every drain also
reports Redis's CPU per task (``redis_cost``).

More benchmarks measure ours alone: ``python -m bench.soak`` (a worker's RSS over a million tasks),
``python -m bench.scale`` (two workers on one queue: combined rate, per-worker share, nothing run twice) and
``python -m bench.stages`` (µs per task of each consumer stage, wall and CPU).
"""
