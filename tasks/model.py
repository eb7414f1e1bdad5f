"""A small text-scoring model: hashed bag of words -> embedding bag -> MLP -> probability that a text is positive.

It stands in for a real model with a real model's cost profile: every call pays a fixed cost (a few array
operations whose setup dominates a single text) and a per-text cost that is small once many texts share the call
— the reason dynamic batching pays off. Weights are seeded random plus a sentiment lexicon, so outputs are
deterministic and meaningful enough to check ("great" scores above "awful").
"""

from __future__ import annotations

import os
import re
import zlib

# One BLAS thread unless told otherwise: the worker's batching threads need the other core, and OpenBLAS's own
# spinning thread pool makes a small matrix product slower, not faster, on a busy two-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # after the thread setting, which OpenBLAS reads when numpy loads

#: Hashed vocabulary size, embedding width and hidden width. The 2048 x 2048 hidden layer (16 MiB) is read from
#: memory once per call whatever the batch size, as a real model's weights are: that is the per-call cost.
DIM, EMBED, HIDDEN = 2**14, 128, 2048
_LEXICON = {
    "good": 1.0, "great": 1.5, "love": 1.5, "excellent": 2.0, "nice": 0.8, "happy": 1.0, "fast": 0.5,
    "bad": -1.0, "awful": -2.0, "hate": -1.5, "terrible": -2.0, "slow": -0.5, "broken": -1.2, "sad": -1.0,
}
_WORD = re.compile(r"[a-z']+")


def _bucket(word: str) -> int:
    return zlib.crc32(word.encode()) % DIM  # stable across processes, unlike hash()


class SentimentModel:
    """Scores texts; ``run`` is the per-request signature, ``run_batch`` the batched implementation."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.embedding = rng.standard_normal((DIM, EMBED), dtype=np.float32) * 0.1
        self.w1 = rng.standard_normal((EMBED, HIDDEN), dtype=np.float32) * 0.05
        self.w2 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * (1.0 / HIDDEN**0.5)
        self.w3 = rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01
        self.lexicon = np.zeros(DIM, dtype=np.float32)
        for word, weight in _LEXICON.items():
            self.lexicon[_bucket(word)] = weight

    def run(self, text: str, scale: float = 1.0) -> float:
        return self.run_batch([text], [scale])[0]

    def run_batch(self, text: list[str], scale: list[float]) -> list[float]:
        tokens = [[_bucket(w) for w in _WORD.findall(t.lower())] or [0] for t in text]
        ids = np.fromiter((i for row in tokens for i in row), dtype=np.int64)
        starts = np.cumsum([0] + [len(row) for row in tokens[:-1]])
        counts = np.array([len(row) for row in tokens], dtype=np.float32)
        bag = np.add.reduceat(self.embedding[ids], starts, axis=0) / counts[:, None]  # mean embedding per text
        hidden = np.maximum(bag @ self.w1, 0.0)
        hidden = np.maximum(hidden @ self.w2, 0.0)
        logits = hidden @ self.w3 + np.add.reduceat(self.lexicon[ids], starts) * 2.0
        probs = 1.0 / (1.0 + np.exp(-logits))
        return (probs * np.asarray(scale, dtype=np.float32)).round(6).tolist()
