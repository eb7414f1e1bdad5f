"""Models with the same batch semantics for every system: a list of inputs in, one output per input out.

Plain Celery calls them with a batch of one; the batchers call them with whatever batch they formed. Inputs are
the request indices the clients send (`x=i`); `embed` turns each into a short sentence.

`python -m bench.models raw --model embed` times a model's batched call in-process, with no Celery at all: the
ceiling a batching framework can approach.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

Model = Callable[[Sequence[Any]], Any]

#: Fixed cost of one `accel` call, in seconds (kernel launch + transfer, as a GPU looks from the host).
ACCEL_FIXED_S = 0.005
#: Extra cost of one item in an `accel` call, in seconds.
ACCEL_PER_ITEM_S = 0.00005
#: Threads torch may use for `embed`: one, so that raw, plain and ours compare like for like and the numbers stay
#: stable on a 2-core machine (the other core is the framework's and Redis's).
EMBED_THREADS = 1
#: Models that need packages the peers' virtualenv lacks (celery-batches pins celery<5.7 and has neither torch
#: nor numpy), with the package each needs.
PEERS_LACK = {"embed": "torch", "cpu": "numpy"}
#: Redis keys written by `recording`: the set of inputs run, the number of inputs run, and inputs run per pid.
RECORD_SEEN = "bench:record:seen"
RECORD_RUNS = "bench:record:runs"
RECORD_BY_PID = "bench:record:by-pid"

_SUBJECTS = ("The courier", "A customer", "Our support team", "The warehouse", "My neighbour", "The new app")
_VERBS = ("delivered", "praised", "returned", "lost", "reviewed", "recommended")
_OBJECTS = ("the blue kettle", "a pair of boots", "the quarterly report", "two concert tickets", "the spare keys")


def noop(xs: Sequence[Any]) -> list[Any]:
    """Return the inputs: what is left to measure is the framework's own overhead."""
    return list(xs)


def accel(xs: Sequence[Any]) -> list[Any]:
    """Cost 5 ms + 0.05 ms per item, spent sleeping: the CPU stays free for the framework, as with a GPU."""
    time.sleep(ACCEL_FIXED_S + ACCEL_PER_ITEM_S * len(xs))
    return list(xs)


def sentence(i: int) -> str:
    """A short, distinct English sentence for request index `i` (any int, the warm-up sends negative ones)."""
    subject = _SUBJECTS[i % len(_SUBJECTS)]
    verb = _VERBS[(i // len(_SUBJECTS)) % len(_VERBS)]
    obj = _OBJECTS[(i // 7) % len(_OBJECTS)]
    return f"{subject} {verb} {obj} on order {i}."


#: The seed of `mix_text`'s mix: the same texts for every run and every mode.
MIX_SEED = 12
#: Share of long texts in the mix.
MIX_LONG_SHARE = 0.2
#: Sentences in a long text of the mix (about 150 words, 190 tokens: under the model's 256-token window).
MIX_LONG_SENTENCES = 15


def mix_text(i: int) -> str:
    """Text `i` of a fixed mix: 80 % one short sentence (about 10 words), 20 % fifteen of them, by a seeded draw."""
    if random.Random(MIX_SEED * 1_000_003 + i).random() < MIX_LONG_SHARE:
        return " ".join(sentence(i * MIX_LONG_SENTENCES + k) for k in range(MIX_LONG_SENTENCES))
    return sentence(i)


@functools.cache
def _embedder() -> Any:
    """`tasks.embeddings.Embedder`, built once per process on first use (clients never load torch)."""
    # Rust tokenizers would otherwise spread each batch over every core, competing with the framework.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from celery import _state

    torch.set_num_threads(EMBED_THREADS)
    # Importing `tasks` creates the example app, which makes itself Celery's current app; give that role back to
    # the bench app that was current (a worker resolves `current_app` through it).
    current = _state.get_current_app()
    from tasks.embeddings import Embedder

    current.set_current()
    return Embedder()


def embed(xs: Sequence[Any]) -> Any:
    """all-MiniLM-L6-v2 sentence embeddings (a float32 array of 384 per input), one forward pass per call, on one
    CPU thread."""
    return _embedder().run_batch([sentence(int(x)) for x in xs])


@functools.cache
def _sentiment() -> Any:
    """The example app's `tasks.model.SentimentModel`, built once per process on first use."""
    from celery import _state

    current = _state.get_current_app()  # importing `tasks` makes the example app current: give the role back
    from tasks.model import SentimentModel

    current.set_current()
    return SentimentModel()


def cpu(xs: Sequence[Any]) -> list[Any]:
    """The example app's text-scoring model (numpy, one BLAS thread): CPU-bound, as a model served on CPUs is."""
    scores: list[Any] = _sentiment().run_batch([sentence(int(x)) for x in xs], [1.0] * len(xs))
    return scores


MODELS: dict[str, Model] = {"noop": noop, "accel": accel, "embed": embed, "cpu": cpu}


def get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def recording(model: Model, url: str) -> Model:
    """`model`, plus one Redis round trip per call that records which inputs ran, how many, and in which process.

    An input that ran twice shows as `RECORD_RUNS` > `SCARD RECORD_SEEN`: evidence from the model's side,
    independent of the library's own counters.
    """
    import redis

    client = redis.Redis.from_url(url)
    pid = str(os.getpid())

    def recorded(xs: Sequence[Any]) -> list[Any]:
        outputs = model(xs)
        if xs:
            pipe = client.pipeline(transaction=False)
            pipe.sadd(RECORD_SEEN, *xs)
            pipe.incrby(RECORD_RUNS, len(xs))
            pipe.hincrby(RECORD_BY_PID, pid, len(xs))
            pipe.execute()
        return outputs

    return recorded


def raw_rate(name: str, *, batch_size: int, n: int) -> dict[str, Any]:
    """Items per second of `name` called directly on batches of `batch_size`, after one warm-up batch."""
    model = get_model(name)
    model(list(range(-batch_size, 0)))  # loads the model and warms its first-call paths
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    start = time.perf_counter()
    for batch in batches:
        model(batch)
    elapsed = time.perf_counter() - start
    return {"model": name, "batch_size": batch_size, "n": n, "elapsed_s": elapsed, "rate": n / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description="time a model in-process")
    parser.add_argument("mode", choices=("raw",))
    parser.add_argument("--model", choices=tuple(MODELS), required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=1280, help="items to run, after one warm-up batch")
    args = parser.parse_args(argv)
    print(json.dumps(raw_rate(args.model, batch_size=args.batch_size, n=args.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
