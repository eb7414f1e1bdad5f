"""A replicated Redis on loopback for the durability tests: a master, one replica, optionally a Sentinel."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from batching.redis_server import find_redis_server, free_port, terminate
from tests.waiting import wait_until

MASTER_NAME = "mymaster"
COMMON = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


@dataclass
class Topology:
    """The servers' ports and processes; ``master``/``replica`` are as started (a failover swaps the roles)."""

    master_port: int
    replica_port: int
    sentinel_port: int | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workdir: Path = Path(".")

    @property
    def master_url(self) -> str:
        return f"redis://127.0.0.1:{self.master_port}/0"

    @property
    def sentinel_url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/0"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis(port=self.replica_port if role == "replica" else self.master_port, socket_timeout=5)

    def sentinel(self) -> redis.Redis:
        assert self.sentinel_port is not None
        return redis.Redis(port=self.sentinel_port, socket_timeout=5)

    def current_master(self) -> redis.Redis:
        """A client of whichever server the Sentinel says is the master now."""
        host, port = self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return redis.Redis(host=host.decode(), port=int(port), socket_timeout=5)

    def signal(self, role: str, sig: int) -> None:
        os.kill(self.procs[role].pid, sig)

    def restart_master(self) -> None:
        """Start the (killed) original master again, empty, on its port: the Sentinel makes it a replica."""
        self.procs["master"].wait(10)
        self.procs["master"] = _server(["--port", str(self.master_port), *COMMON], self.workdir, "master-again")


def _server(args: list[str], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    log = workdir / f"{name}.log"
    return subprocess.Popen([find_redis_server(), *args, "--dir", str(workdir), "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def replicated_redis(workdir: Path, *, sentinel: bool = False) -> Iterator[Topology]:
    """Start a master and a replica of it (and a Sentinel watching them, quick to fail over); stop them all after."""
    topo = Topology(free_port(), free_port(), free_port() if sentinel else None, workdir=workdir)
    common = COMMON
    try:
        topo.procs["master"] = _server(["--port", str(topo.master_port), *common], workdir, "master")
        topo.procs["replica"] = _server(
            ["--port", str(topo.replica_port), *common, "--replicaof", "127.0.0.1", str(topo.master_port)],
            workdir, "replica",
        )

        def linked() -> bool:
            with contextlib.suppress(redis.RedisError):
                return topo.client("replica").info("replication").get("master_link_status") == "up"
            return False

        wait_until(linked, 20, "the replica to sync with its master", interval=0.05)
        if sentinel:
            conf = workdir / "sentinel.conf"  # Sentinel rewrites its config file: it must be writable
            conf.write_text(
                f"port {topo.sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {topo.master_port} 1\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 4000\n"
            )
            topo.procs["sentinel"] = subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel", "--logfile", str(workdir / "sentinel.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

            def knows_replica() -> bool:
                with contextlib.suppress(redis.RedisError):
                    return bool(topo.sentinel().execute_command("SENTINEL", "REPLICAS", MASTER_NAME))
                return False

            wait_until(knows_replica, 20, "the sentinel to discover the replica", interval=0.1)
        yield topo
    finally:
        for proc in topo.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a test may have left one stopped
            terminate(proc, 5)
