"""Model instances in processes of their own beside the worker (``instances=N``), run by its main process.

For each task served this way the worker starts N processes (``python -m batching.worker.instance``), one per
instance index, whatever its pool and ``-c``. This module starts them, feeds them (revokes, whether events are
on, ``stop``), takes in what they report (held items for ``inspect``, metrics for the one endpoint) and watches
them: an instance that dies (a segfault, the OOM killer, ``kill -9``) is started again after a backoff that
doubles while it keeps dying young (1 s up to 30 s); its claims come back through their lease, to it or to the
other instances. One that ends on purpose — recycled after ``max_tasks_per_instance`` requests or above
``max_memory_per_instance`` — is replaced at once. The worker's main process never builds the model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from celery.worker import state as worker_state

from ..errors import ConfigurationError
from . import remote
from .tunables import STOP_TIMEOUT_S

logger = logging.getLogger(__name__)

#: Backoff before starting a dead instance again, in seconds: doubles from the first to the last while it keeps
#: dying within ``STABLE_S`` of its start.
BACKOFF_S = (1.0, 30.0)
STABLE_S = 60.0
#: How often the instance processes are checked, in seconds.
CHECK_S = 0.2
#: Longest a revoke command waits for the instance processes to apply it before it replies, in seconds.
REVOKE_WAIT_S = 2.0
ENTRY = "batching.worker.instance"


class InstanceProcess:
    """One instance index of one task: the process currently serving it, and its link."""

    def __init__(self, pool: InstancePool, task: Any, index: int) -> None:
        self.pool = pool
        self.task = task
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.reported = remote.Reported()
        self.started_at = 0.0
        self.backoff_s = BACKOFF_S[0]
        self.restart_at: float | None = 0.0  # due now
        self.ended = ""  # why it said it ends (recycling, stop); empty if it died
        self.restarts = 0
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        ours, theirs = socket.socketpair()
        spec = dict(self.pool.spec, task=self.task.name, index=self.index, fd=theirs.fileno(),
                    events=self.pool.events_enabled(), revoked=remote.revoked_ids(),
                    tuned=self.pool.tuned.get(self.task.name))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", ENTRY, json.dumps(spec)], pass_fds=(theirs.fileno(),),
                env=self.pool.env(self.index),
                # Its own session: a Ctrl-C or a signal to the worker's process group reaches the worker alone,
                # which then stops its instances warm, after the batches in hand.
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.started_at, self.restart_at, self.ended = time.monotonic(), None, ""
        threading.Thread(target=self._listen, args=(self.conn,), name=f"batching-instance-{self.index}",
                         daemon=True).start()
        logger.info("batching %s: started instance %d in process %d", self.task.name, self.index, self.proc.pid)

    def send(self, message: tuple[Any, ...]) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            with self._lock:
                conn.send(message)
        except (OSError, ValueError):
            pass  # it is ending: the check sees it

    def _listen(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            try:
                self.pool.received(self, message)
            except Exception:
                logger.exception("batching %s: a report of instance %d could not be used", self.task.name,
                                 self.index)

    def check(self, now: float, stopping: bool) -> None:
        """Notice an ended process; start a new one when due."""
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            self._ended(proc.returncode, now)
        if self.proc is None and not stopping and self.restart_at is not None and now >= self.restart_at:
            self.spawn()

    def _ended(self, code: int, now: float) -> None:
        self.reported.update([], [])
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None
        self.restarts += 1
        if self.ended and code == 0:
            logger.info("batching %s: instance %d ended (%s); starting a new one", self.task.name, self.index,
                        self.ended)
            self.restart_at, self.backoff_s = now, BACKOFF_S[0]
            return
        died = f"killed by signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit code {code}"
        self.backoff_s = BACKOFF_S[0] if now - self.started_at >= STABLE_S else self.backoff_s
        logger.error("batching %s: instance %d died (%s); starting it again in %gs. Its claims come back through "
                     "their lease", self.task.name, self.index, died, self.backoff_s)
        self.restart_at = now + self.backoff_s
        self.backoff_s = min(BACKOFF_S[1], self.backoff_s * 2)

    def stop(self, deadline: float) -> None:
        """Wait for a process told to stop; kill it at ``deadline`` (its claims then come back by lease)."""
        proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("batching %s: instance %d still busy at shutdown; killed (its claims come back through "
                           "their lease)", self.task.name, self.index)
            proc.kill()
            proc.wait()
        self.reported.clear()


class InstancePool:
    """The instance processes of a worker's tasks with ``instances=N``."""

    def __init__(self, worker: Any, tasks: list[Any], metrics: Any = None,
                 events_enabled: Callable[[], bool] = lambda: False, switch_interval_s: float | None = None) -> None:
        self.spec = dict(app=app_spec(worker.app, tasks), hostname=worker.hostname, sys_path=sys.path,
                         loglevel=getattr(worker, "loglevel", None), logfile=getattr(worker, "logfile", None),
                         switch_interval_s=switch_interval_s)
        self.metrics = metrics
        self.events_enabled = events_enabled
        self.instances = [InstanceProcess(self, task, index)
                          for task in tasks for index in range(task.batching.instances)]
        self._events = events_enabled()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._acks: dict[int, threading.Event] = {}
        self._acks_lock = threading.Lock()
        self._disconnect = remote.on_revoke(self._revoked)
        #: Each task's settings as its instances serve them, and what ``batching_set`` changed (a restarted or
        #: recycled instance starts with the changes too).
        self.settings = {task.name: task.worker_settings() for task in tasks}
        self.tuned: dict[str, dict[str, Any]] = {}

    def retune(self, name: str, settings: Any, changes: dict[str, Any]) -> None:
        """``batching_set`` for a task served by instances: checked already (``settings`` is the result); every
        instance of the task applies ``changes`` from its next batch on."""
        self.settings[name] = settings
        tuned = self.tuned.setdefault(name, {})
        tuned.update(changes)
        for instance in self.instances:
            if instance.task.name == name:
                instance.send(("retune", dict(tuned)))

    def env(self, index: int) -> dict[str, str]:
        return {**os.environ, "BATCHING_INSTANCE": str(index)}

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="batching-instances", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(CHECK_S):
            try:
                self.check()
            except Exception:
                logger.exception("batching: checking the instance processes failed; checking again")

    def check(self) -> None:
        now, stopping = time.monotonic(), self._stopping.is_set()
        events = self.events_enabled()
        for instance in self.instances:
            instance.check(now, stopping)
            if events != self._events:
                instance.send(("events", events))
        self._events = events

    def received(self, instance: InstanceProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "held":
            instance.reported.update(message[1], message[2])
        elif kind == "metric":
            if message[1] == "batch_ran":  # ``inspect stats`` counts what instances ran, as for in-process items
                task, size = message[2][0], int(message[2][1])
                worker_state.total_count[task] += size
                worker_state.all_total_count[0] += size
            if self.metrics is not None:
                getattr(self.metrics, message[1])(*message[2])
        elif kind == "counter" and self.metrics is not None:
            getattr(self.metrics, message[1]).labels(message[2]).inc(message[3])
        elif kind == "ended":
            instance.ended = message[1]
        elif kind == "revoked":
            with self._acks_lock:
                applied = self._acks.get(message[1])
            if applied is not None:
                applied.set()

    def _revoked(self, ids: list[str], terminate: bool, signal_name: Any) -> None:
        """Forward a revoke to every instance process and wait (briefly) until each has applied it, so that, as
        in-process, the command's reply means it holds: terminated items are REVOKED already."""
        waiting = []
        for instance in self.instances:
            if instance.conn is None:
                continue
            applied = threading.Event()
            with self._acks_lock:
                self._acks[id(applied)] = applied
            instance.send(("revoke", ids, terminate, signal_name, id(applied)))
            waiting.append(applied)
        deadline = time.monotonic() + REVOKE_WAIT_S
        for applied in waiting:
            applied.wait(max(0.0, deadline - time.monotonic()))
            with self._acks_lock:
                self._acks.pop(id(applied), None)

    def request_stop(self) -> None:
        """Every instance finishes its batch in hand and gives back the rest, all at once."""
        self._stopping.set()
        self._disconnect()
        for instance in self.instances:
            instance.send(("stop",))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(CHECK_S * 5)
        deadline = time.monotonic() + timeout_s
        for instance in self.instances:
            instance.stop(deadline)


def app_spec(app: Any, tasks: list[Any]) -> str:
    """How an instance process finds the worker's app, as ``celery -A`` takes it: ``module:attribute`` of a module
    that holds it — the module named as the app, else one that defines one of ``tasks``, else the shortest name
    (Celery's, kombu's and our own modules aside: they hold the current app, not the one a user names)."""
    defining = {getattr(task, "__module__", None) for task in tasks}
    found = []
    for name, module in list(sys.modules.items()):
        if not isinstance(module, ModuleType) or name == "__main__" or name.split(".")[0] in _NOT_APPS:
            continue
        for attribute, value in list(vars(module).items()):
            if value is app:
                found.append((name != app.main, name not in defining, len(name), name, attribute))
    if not found:
        raise ConfigurationError(
            f"instances=N needs the app {app.main!r} importable by its instance processes, but no module holds it "
            "as an attribute: define it at module level (app = Celery(...)) and start the worker with -A module"
        )
    *_, name, attribute = min(found)
    return f"{name}:{attribute}"


_NOT_APPS = frozenset({"celery", "kombu", "batching", "billiard"})
