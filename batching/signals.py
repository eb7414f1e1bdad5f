"""Signals of this library, as Celery's own (``celery.signals``): connect receivers where the app is defined.

``instance_init`` is sent in each model instance process of a task with ``instances=N`` (or a recycled one),
once, after the app is loaded and before that process claims anything or builds its model — the place to pin an
instance to a device::

    from batching.signals import instance_init

    @instance_init.connect
    def pin(sender, index, **kwargs):            # sender: the batched task; index: 0 .. instances-1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % 2)

Arguments: ``sender`` (the task), ``index`` (which instance: a restarted or recycled instance keeps its index),
``pid``. The same index is in the process's environment as ``BATCHING_INSTANCE`` from its start, for code that
runs at import. A receiver that raises stops the instance (it is restarted with backoff), as a model that fails to
load would.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["instance_init"]

instance_init = Signal(name="instance_init")
