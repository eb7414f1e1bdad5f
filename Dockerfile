# One image for the example app's worker, Flower and web front (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY batching ./batching
COPY tasks ./tasks
# The embeddings extra is not in the default image: it needs torch, and pip would take PyPI's CUDA build (several
# GB). To serve tasks.embed, install a CPU build of torch first, then add the extra here.
RUN pip install ".[example]"

# Unprivileged: nothing here needs root, and Celery warns when a worker runs as root.
RUN useradd --create-home --uid 10001 app
USER app

CMD ["celery", "-A", "tasks", "worker", "-E", "-l", "INFO"]
