"""A small text-scoring model: hashed bag of words -> two-layer MLP -> probability that a text is positive.

It stands in for a real model with a real model's cost profile: a forward pass reads a 16 MiB weight matrix, so
scoring one text at a time is bound by memory traffic, while a batch reads the weights once for all its texts —
the reason dynamic batching pays off. Weights are seeded random plus a small sentiment lexicon, so outputs are
deterministic and meaningful enough to check ("great" scores above "awful").
"""

from __future__ import annotations

import re
import zlib

import numpy as np

#: Hashed vocabulary size and hidden width; 2**14 x 256 float32 = 16 MiB of weights.
DIM, HIDDEN = 2**14, 256
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
        self.w1 = (rng.standard_normal((DIM, HIDDEN), dtype=np.float32) * 0.01).astype(np.float32)
        self.w2 = (rng.standard_normal(HIDDEN, dtype=np.float32) * 0.01).astype(np.float32)
        # The lexicon rides on a dedicated hidden unit so its words dominate the random weights.
        for word, weight in _LEXICON.items():
            self.w1[_bucket(word), 0] = weight * 4.0
        self.w2[0] = 1.0

    def features(self, texts: list[str]) -> np.ndarray:
        x = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                x[row, _bucket(word)] += 1.0
        return x

    def run(self, text: str, scale: float = 1.0) -> float:
        return self.run_batch([text], [scale])[0]

    def run_batch(self, text: list[str], scale: list[float]) -> list[float]:
        hidden = self.features(text) @ self.w1
        np.maximum(hidden[:, 1:], 0.0, out=hidden[:, 1:])  # unit 0 (the lexicon) stays linear
        logits = hidden @ self.w2
        probs = 1.0 / (1.0 + np.exp(-logits))
        return (probs * np.asarray(scale, dtype=np.float32)).round(6).tolist()
