"""One model instance in a process of its own: ``python -m batching.worker.instance <spec>``, started by the
worker's main process (``instances``) for a task with ``instances=N``.

The process starts clean — a new interpreter, not a fork of the worker, whose threads a fork would not carry —
and loads the app as ``celery -A`` does, so the task, its model and the signal receivers connected at import are
the worker's. It runs one ``BatchConsumer``, the same three threads the worker runs in-process, and talks to the
worker over one socket (pickled tuples, ``multiprocessing.connection``):

- to the worker: what it holds (for ``inspect active`` / ``reserved``), its metrics per batch;
- from the worker: revokes, whether task events are on, and ``stop``.

It ends when told to stop, when the worker's end of the socket closes (the worker died), and when it is due for
recycling (``max_tasks_per_instance`` / ``max_memory_per_instance``). Each time it stops as at warm shutdown —
claims nothing more, gives back the batch not yet started, stores the one in hand — and exits 0. Killed instead,
its claims come back through their lease.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from billiard.compat import mem_rss
from celery.signals import worker_process_init

from .. import tuning
from ..errors import ConfigurationError
from ..signals import instance_init
from . import control, remote
from .consumer import BatchConsumer
from .metrics import Metrics, tally
from .tunables import STOP_TIMEOUT_S

logger = logging.getLogger(__name__)

#: How often what the instance holds is compared with what it last reported, in seconds.
REPORT_S = 0.2
#: Exit status of an instance whose start failed (the app, the task, an ``instance_init`` receiver).
FAILED_START = 3


class Link:
    """The instance's end of the socket to the worker; sends from any thread."""

    def __init__(self, fd: int) -> None:
        self.conn = Connection(fd)
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def send(self, message: tuple[Any, ...]) -> None:
        if self.closed.is_set():
            return
        try:
            with self._lock:
                self.conn.send(message)
        except OSError:  # the worker is gone: stop (``serve`` watches ``closed``)
            self.closed.set()
        except Exception as exc:  # a report that cannot be pickled (an exotic argument): nothing was written
            logger.warning("batching: could not report %r to the worker: %s", message[0], exc)


class ReportedMetrics(Metrics):
    """The worker's metrics, fed from here: every update is sent to the worker, which owns the one endpoint. Also
    counts the requests served, for ``max_tasks_per_instance``."""

    def __init__(self, link: Link, served: Any) -> None:
        super().__init__()  # a private registry, never served: only the calls below reach the worker
        self.link = link
        self.served = served
        for name in ("late_outcomes", "dead_lettered", "data_lost"):
            setattr(self, name, _ReportedCounter(link, name))

    def batch_ran(self, task: str, *args: Any) -> None:
        self.link.send(("metric", "batch_ran", (task, *args)))

    def settled(self, task: str, outcomes: Any, claimed_at: float, dead: int) -> None:
        counts, waits = tally(outcomes, claimed_at)
        self.link.send(("metric", "record_settled", (task, counts, waits, dead)))
        self.served(len(outcomes))


class _ReportedCounter:
    """``counter.labels(task).inc(n)``, sent to the worker."""

    def __init__(self, link: Link, name: str) -> None:
        self.link, self.name, self._task = link, name, ""

    def labels(self, task: str) -> _ReportedCounter:
        counter = _ReportedCounter(self.link, self.name)
        counter._task = task
        return counter

    def inc(self, amount: float = 1) -> None:
        self.link.send(("counter", self.name, self._task, amount))


class Instance:
    """The consumer of one instance process, and why it should end."""

    def __init__(self, spec: dict[str, Any], link: Link, task: Any) -> None:
        self.spec = spec
        self.link = link
        self.index = int(spec["index"])
        self.events = bool(spec.get("events"))
        self.max_tasks = task.batching.max_tasks_per_instance
        self.max_memory_kib = task.batching.max_memory_per_instance
        self.served = 0
        self.done = threading.Event()
        self.reason = ""
        self.metrics = ReportedMetrics(link, self._served)
        self.consumer = BatchConsumer.for_task(task, hostname=spec["hostname"], events_enabled=lambda: self.events,
                                               metrics=self.metrics)
        if spec.get("tuned"):
            self.retune(spec["tuned"])

    def retune(self, changes: dict[str, Any]) -> None:
        """What ``batching_set`` changed, as the worker forwards it (checked there already)."""
        try:
            self.consumer.retune(tuning.retuned(self.consumer.settings, changes))
        except ConfigurationError as exc:  # the worker checked the same values: only a bug gets here
            logger.error("batching %s: instance %d refused %s: %s", self.consumer.name, self.index, changes, exc)

    def _served(self, n: int) -> None:
        self.served += n
        if self.max_tasks is not None and self.served >= self.max_tasks:
            self.end(f"recycled after {self.served} request(s) (max_tasks_per_instance={self.max_tasks})")
        elif self.max_memory_kib is not None and (used := mem_rss()) > self.max_memory_kib:
            self.end(f"recycled at {used} KiB resident (max_memory_per_instance={self.max_memory_kib})")

    def end(self, reason: str) -> None:
        if not self.done.is_set():
            self.reason = reason
            self.done.set()

    def listen(self) -> None:
        """The worker's messages, until it says stop or its end closes."""
        while True:
            try:
                message = self.link.conn.recv()
            except (EOFError, OSError):
                self.link.closed.set()
                self.end("the worker's end of its link closed")
                return
            kind = message[0]
            if kind == "stop":
                self.end("the worker is stopping")
            elif kind == "revoke":
                remote.revoke_here(message[1], message[2], message[3])
                self.link.send(("revoked", message[4]))
            elif kind == "retune":
                self.retune(message[1])
            elif kind == "events":
                self.events = bool(message[1])

    def serve(self) -> None:
        """Serve until the instance should end, reporting what it holds as it changes; then stop warm."""
        consumer = self.consumer
        consumer.connect()
        remote.revoke_here(self.spec.get("revoked") or (), False)
        consumer.start()
        threading.Thread(target=self.listen, name="batching-instance-link", daemon=True).start()
        last: Any = None
        while not self.done.wait(REPORT_S):
            if self.link.closed.is_set():
                self.end("the worker's end of its link closed")
                break
            if consumer.dead_threads():  # the worker starts a fresh process, as its supervisor would a consumer
                self.end(f"consumer thread(s) {', '.join(consumer.dead_threads())} stopped unexpectedly")
                break
            held = control.snapshot()
            if held != last:
                self.link.send(("held", *held))
                last = held
        logger.info("batching %s: instance %d (pid %d) stopping: %s", consumer.name, self.index, os.getpid(),
                    self.reason)
        consumer.request_stop()
        consumer.stop(STOP_TIMEOUT_S)
        self.link.send(("held", [], []))
        self.link.send(("ended", self.reason))


def load(spec: dict[str, Any]) -> Any:
    """The batched task, from the app loaded as ``celery -A`` loads it, with its modules imported as a worker
    imports them."""
    from celery.app.utils import find_app

    app = find_app(spec["app"])
    app.set_current()
    app.loader.import_default_modules()
    app.finalize(auto=True)
    # Logging as the worker's, set up after the tasks are bound, as the worker does (binding warns of things the
    # worker has already let pass). Until then, a failure reaches stderr, the worker's log, through ``logging``.
    app.log.setup(loglevel=spec.get("loglevel"), logfile=spec.get("logfile"), hostname=spec["hostname"])
    return app.tasks[spec["task"]]


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    sys.path[:] = spec.get("sys_path") or sys.path  # the worker's: the app's modules import as there
    # Shown as %(processName)s in Celery's log format: every line says which instance wrote it.
    multiprocessing.current_process().name = f"Instance-{spec['index']}"
    link = Link(int(spec["fd"]))
    if spec.get("switch_interval_s"):  # the worker's setting (batching_switch_interval), for the same reason
        sys.setswitchinterval(spec["switch_interval_s"])
    try:
        task = load(spec)
        # A process that runs tasks, as a pool process is: receivers that set up per-process clients (OpenTelemetry,
        # Sentry, database pools) do it here too.
        worker_process_init.send(sender=None)
        for _receiver, response in instance_init.send(sender=task, index=int(spec["index"]), pid=os.getpid()):
            if isinstance(response, Exception):
                raise response
        instance = Instance(spec, link, task)
    except Exception:
        logger.exception("batching: instance %s of %s failed to start", spec["index"], spec["task"])
        return FAILED_START
    logger.info("batching %s: instance %d of %d serving in process %d (its model is built here, on its first "
                "batch)", task.name, instance.index, task.batching.instances, os.getpid())
    instance.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
