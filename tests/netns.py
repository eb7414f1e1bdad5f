"""Another "host" for tests: a network namespace joined to this one by a veth pair, whose link can be cut.

Only addresses inside namespaces the test itself creates are used (10.213.<n>.1 here, .2 there); nothing leaves
the machine. Needs root and the ``ip`` and ``iptables`` commands (.ci/run installs iptables).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str
    #: This side's address (where the test's Redis listens) and the namespace's own.
    here: str
    there: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on the host: ``[*host.prefix, cmd, ...]``."""
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        """A silent partition: every packet between the host and here is dropped, nothing is refused."""
        for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
            _run(*self.prefix, "iptables", "-A", chain, flag, self.here, "-j", "DROP")

    def heal(self) -> None:
        for chain in ("OUTPUT", "INPUT"):
            _run(*self.prefix, "iptables", "-F", chain)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def available() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [c for c in ("ip", "iptables") if shutil.which(c) is None]
    return f"missing {', '.join(missing)}" if missing else None


@contextlib.contextmanager
def host(index: int) -> Iterator[Host]:
    name, outer, inner = f"bt{os.getpid() % 10000}-{index}", f"bth{os.getpid() % 10000}{index}", f"btw{index}"
    h = Host(name, f"10.213.{index}.1", f"10.213.{index}.2")
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", name)
        _run("ip", "addr", "add", f"{h.here}/24", "dev", outer)
        _run("ip", "link", "set", outer, "up")
        _run(*h.prefix, "ip", "addr", "add", f"{h.there}/24", "dev", inner)
        _run(*h.prefix, "ip", "link", "set", inner, "up")
        _run(*h.prefix, "ip", "link", "set", "lo", "up")
        yield h
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            _run("ip", "link", "del", outer)  # takes its peer with it
        with contextlib.suppress(subprocess.SubprocessError):
            _run("ip", "netns", "del", name)
