"""Child processes that cannot outlive the harness: workers, clients and the redis-server.

Each child gets its own session (process group), for two reasons: a Ctrl-C in the terminal reaches only the
harness, which then stops children in order instead of racing them; and `killpg` also reaches anything a child
forked (a prefork pool, pip's build steps). The rejected alternative, `Popen.kill()` alone, leaves
grandchildren behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: How long a child gets to exit after SIGTERM before SIGKILL, in seconds (a warm shutdown ends its batch).
STOP_GRACE_S = 10.0

#: Every live child, so that an interrupted run can still stop them all (see `stop_all`).
_LIVE: dict[int, subprocess.Popen[Any]] = {}


class BenchError(RuntimeError):
    """A child failed; the message says which one and where its log is."""


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The harness's environment plus `extra`, the repo root first on PYTHONPATH (for `bench`, `batching`)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # A virtualenv's python ignores VIRTUAL_ENV, but a stale one confuses `python -m venv`/pip inside
    # children.
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def spawn(cmd: Sequence[str], *, env: Mapping[str, str], log: Path | None = None) -> subprocess.Popen[Any]:
    out: Any = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
    try:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # the child holds its own descriptor
    _LIVE[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen[Any], *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's group, then SIGKILL it if it has not exited within `grace_s`."""
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=grace_s)
        else:
            # The leader is gone but a grandchild may still hold the group.
            _signal_group(proc, signal.SIGKILL)
    finally:
        _LIVE.pop(proc.pid, None)


def stop_all() -> None:
    """Stop every child still alive, newest first (workers before the redis-server they talk to)."""
    for proc in reversed(list(_LIVE.values())):
        stop(proc, grace_s=2.0)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # start_new_session makes the pid the group id


@contextmanager
def running(cmd: Sequence[str], *, env: Mapping[str, str], log: Path | None = None) -> Iterator[subprocess.Popen[Any]]:
    proc = spawn(cmd, env=env, log=log)
    try:
        yield proc
    finally:
        stop(proc)


def run_json(cmd: Sequence[str], *, env: Mapping[str, str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run a client to completion and return the JSON object on the last line of its stdout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _LIVE[proc.pid] = proc
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"client timed out after {timeout_s:.0f} s: {' '.join(cmd)} (log: {log})") from None
        finally:
            stop(proc, grace_s=2.0)
    lines = [line for line in stdout.decode().splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"client exited with {proc.returncode}: {' '.join(cmd)} (log: {log})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def celery_worker_pid(root: int, *, timeout_s: float = 10.0) -> int:
    """The pid of the `celery ... worker` main process at or under `root` (Linux /proc).

    The shallowest match is the one wanted: a shell or launcher above it is a wrapper, and a prefork pool's
    children below it are not where the batching consumers run (they live in the main process whatever the pool).
    Looked for until `timeout_s`: just after Popen returns, /proc sometimes still shows no command line.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        level = [root]
        while level:
            for pid in level:
                argv = _cmdline(pid)
                if any("celery" in a for a in argv) and "worker" in argv and "python" in _exe(pid):
                    return pid
            level = [c for pid in level for c in _children(pid)]
        if time.monotonic() > deadline:
            raise BenchError(f"no celery worker process at or under pid {root} after {timeout_s:g} s")
        time.sleep(0.05)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def instance_pids(worker: int) -> list[int]:
    """The model instance processes (``instances=N``) the worker ``worker`` runs beside it."""
    return [c for c in _children(worker) if "batching.worker.instance" in _cmdline(c)]


def memory_kib(pid: int) -> dict[str, int]:
    """`VmRSS` (resident now) and `VmHWM` (peak resident) of `pid`, in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
