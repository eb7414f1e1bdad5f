"""The mixed-length embedding benchmark's app (`python -m bench --models embed --mix`): all-MiniLM-L6-v2 on a fixed,
seeded mix of short and long texts, batched one of three ways (`BENCH_MIX_MODE`):

- `fifo`: by count only (`batch_size`), as any batcher without a cost does;
- `budget`: a padded token budget (`cost=`, `max_batch_cost=`, `padded=True`), filled in claim order, as TEI does;
- `bucket`: the same budget, with `bucket=True`.

The cost is the text's word count, computed in the client from the request's `x` (a user would count words or
tokens the same way); the model records the real and the padded token counts of every batch it runs, from the
model's own tokenizer, under `MIX_TOKENS`.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from batching import batched
from bench.config import MIX_BUDGET_ENV, MIX_MODE_ENV, MIX_MODES, MIX_TOKENS, AppSettings
from bench.models import _embedder, mix_text
from bench.systems import make_app

settings = AppSettings.from_env()
mode = os.environ.get(MIX_MODE_ENV, "fifo")
if mode not in MIX_MODES:
    raise RuntimeError(f"{MIX_MODE_ENV}={mode!r}: choose one of {', '.join(MIX_MODES)}")
budget = float(os.environ.get(MIX_BUDGET_ENV, "512"))
app = make_app("bench-mix", settings)
_counts = redis.Redis.from_url(settings.redis_url)


def words(x: int) -> int:
    """A request's cost: the word count of its text."""
    return len(mix_text(int(x)).split())


cost_options: dict[str, Any] = {} if mode == "fifo" else {
    "cost": words, "max_batch_cost": budget, "padded": True, "bucket": mode == "bucket",
}


@batched(app, batch_size=settings.batch_size, max_delay=settings.max_delay_s, name="bench.mix.predict",
         **cost_options)
def predict(x: list[Any]) -> list[Any]:
    texts = [mix_text(int(i)) for i in x]
    model = _embedder().model
    lengths = [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
               ["input_ids"]]
    vectors: list[Any] = _embedder().run_batch(texts)
    pipe = _counts.pipeline(transaction=False)
    pipe.hincrby(MIX_TOKENS, "items", len(texts))
    pipe.hincrby(MIX_TOKENS, "batches", 1)
    pipe.hincrby(MIX_TOKENS, "real", sum(lengths))
    pipe.hincrby(MIX_TOKENS, "padded", max(lengths) * len(lengths))
    pipe.execute()
    return [len(v) for v in vectors]  # the vectors' width: what is stored does not weigh on the comparison
