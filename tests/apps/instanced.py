"""The app the model-instance tests run under a real ``celery worker``: batched tasks with ``instances=N``.

The model records in Redis where it was built and, per item, which process ran it, so a test can tell the
processes apart (the worker's main process, its pool, its instances) and count what ran twice.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from celery.signals import task_postrun, worker_process_init

from batching import batched
from batching.signals import instance_init

URL = os.environ["REDIS_URL"]
app = Celery("instanced", broker=URL, backend=URL)
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)
R = redis.Redis.from_url(URL)


@instance_init.connect
def _note_instance(sender, index, pid, **kwargs):
    """Where a GPU would be pinned: here, recorded so the test sees each index reach its own process."""
    R.rpush("inst:init", f"{sender.name}:{index}:{pid}:{os.environ.get('BATCHING_INSTANCE')}")


def _note_postrun(sender=None, task_id=None, state=None, **kwargs):
    if sender is not None and sender.name == "inst.work":
        R.hincrby("inst:postrun", f"{os.getpid()}:{state}", 1)


@worker_process_init.connect
def _note_process_init(**kwargs):
    R.rpush("inst:process_init", os.getpid())


if os.environ.get("BATCHING_INSTANCE") is not None:
    # Connected at import, as an app connects its receivers; in instance processes only, so that the test process
    # importing this app to send tasks has no receivers of its own (test_signals checks that).
    task_postrun.connect(_note_postrun)


class SlowModel:
    """Takes ``INST_BATCH_S`` (default 0.1 s) per batch; records its builds and every item it runs."""

    def __init__(self) -> None:
        R.rpush("inst:built", f"{type(self).__name__}:{os.getpid()}:{os.getppid()}")

    def run(self, x):
        return self.run_batch([x])[0]

    def run_batch(self, x):
        pipe = R.pipeline(transaction=False)
        pipe.set(f"inst:busy:{os.getpid()}", len(x), ex=5)
        pipe.hincrby("inst:ran_by", str(os.getpid()), len(x))
        pipe.rpush(f"inst:sizes:{type(self).__name__}", f"{os.getpid()}:{len(x)}")
        for v in x:
            pipe.hincrby("inst:runs", str(v), 1)
        pipe.execute()
        time.sleep(float(os.environ.get("INST_BATCH_S", "0.1")))
        return [v * 2 for v in x]


work = batched(app, model=SlowModel, name="inst.work", batch_size=8, max_delay=0.01, instances=2, lease_s=2)


class RecycledModel(SlowModel):
    pass


recycled = batched(app, model=RecycledModel, name="inst.recycled", batch_size=4, max_delay=0.01,
                   max_tasks_per_instance=10, lease_s=2)


class LeakyModel(SlowModel):
    pass


#: Over any process's peak resident memory: replaced after every batch.
leaky = batched(app, model=LeakyModel, name="inst.leaky", batch_size=4, max_delay=0.01, max_memory_per_instance=1,
                lease_s=2)

#: Set by the test to let ``gated`` return.
GATE = "inst:gate"


@batched(app, name="inst.gated", batch_size=4, max_delay=0.2, instances=2)
def gated(x):
    R.rpush("inst:gated_ran", *x)
    deadline = time.monotonic() + 60
    while not R.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [v * 10 for v in x]


@app.task(name="inst.plain")
def plain(x):
    return [x, os.getpid()]
