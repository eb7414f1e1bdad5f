"""The interpreters each system runs under; celery-batches gets a virtualenv of its own, built on demand.

celery-batches 0.11 pins `celery<5.7` while this project needs 5.7, so the two cannot share an environment.
The venv lives at `bench/.venv-peers` (gitignored) and is reused while it still imports `celery_batches`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.processes import BenchError, child_env

PEERS_VENV = Path(__file__).resolve().parent / ".venv-peers"
PEERS_REQUIREMENTS = ("celery-batches==0.11", "celery[redis]<5.7")


def _imports(python: Path | str, statement: str) -> bool:
    probe = subprocess.run(
        [str(python), "-c", statement], env=child_env({}), capture_output=True, timeout=120, check=False
    )
    return probe.returncode == 0


def ensure_peers_venv(log: Path) -> Path:
    """Return the peers' python, creating the venv and installing celery-batches into it when needed."""
    python = PEERS_VENV / "bin" / "python"
    if python.exists() and _imports(python, "import celery_batches, redis"):
        return python
    log.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(PEERS_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", *PEERS_REQUIREMENTS],
    ]
    with log.open("ab") as out:
        for step in steps:
            done = subprocess.run(step, env=child_env({}), stdout=out, stderr=subprocess.STDOUT, timeout=600)
            if done.returncode != 0:
                raise BenchError(f"building {PEERS_VENV} failed at `{' '.join(step)}` (log: {log})")
    return python


def interpreter(system: str, log: Path, python: str) -> Path | str:
    """The python that runs `system`'s worker and client: the peers' venv for celery-batches, else `python`."""
    return ensure_peers_venv(log) if system == "batches" else python


def ours_available(python: str) -> tuple[bool, str]:
    """Whether `from batching import batched` works in `python`, and why not if it does not."""
    probe = subprocess.run(
        [python, "-c", "from batching import batched"],
        env=child_env({}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode == 0:
        return True, ""
    lines = probe.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit code {probe.returncode}"
