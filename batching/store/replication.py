"""Durable writes: a write counts as done only once enough replicas acknowledged it (``wait_replicas``).

Redis replicates asynchronously. A failover promotes a replica that may lack the master's last writes: a message a
client had just pushed, or a claim a consumer had just finished (which then runs again). Redis's ``WAIT n ms``
blocks the connection that wrote until ``n`` replicas acknowledged everything it wrote, or the timeout passes, and
returns how many did. It cannot run inside a Lua script, and it counts only its own connection's writes, so it goes
in the same pipeline as the write it confirms: one round trip, one connection.

A write that stays unacknowledged raises ``NotReplicated``. It is still on the master; whether it survives depends
on whether the master fails before replicating it. Clients pass that on (resending with the same task id is safe:
at least once); consumers treat it as an outage and retry the write, which is idempotent for results and for the
finish of a claim, and release a claim they could not confirm, so its messages are never run without a replica
knowing they were taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import NotReplicated


@dataclass(frozen=True)
class Replicas:
    """How many replicas must acknowledge a write (``wanted``; 0 = asynchronous, no waiting) and for how long."""

    wanted: int = 0
    timeout_s: float = 1.0

    def __bool__(self) -> bool:
        return self.wanted > 0

    def queue_wait(self, pipe: Any) -> None:
        """Add ``WAIT`` to a pipeline, after the writes it confirms."""
        pipe.execute_command("WAIT", self.wanted, max(int(self.timeout_s * 1000), 1))

    def check(self, acked: Any, what: str) -> None:
        """Raise ``NotReplicated`` if ``acked`` (WAIT's reply) is short of ``wanted``."""
        count = int(acked)
        if count < self.wanted:
            raise NotReplicated(
                f"{what} reached the Redis master, but {count} of the {self.wanted} replica(s) asked for "
                f"(wait_replicas) acknowledged it within {self.timeout_s:g}s: a failover now could lose it",
                acked=count, wanted=self.wanted,
            )

    def run(self, client: Any, queue_writes: Callable[[Any], None], what: str) -> list[Any]:
        """The replies of the writes ``queue_writes`` adds to a pipeline, confirmed by ``WAIT`` on the same
        connection when replicas are wanted (without them: the pipeline alone)."""
        with client.pipeline(transaction=False) as pipe:
            queue_writes(pipe)
            if self:
                self.queue_wait(pipe)
            replies = pipe.execute()
        if self:
            self.check(replies.pop(), what)
        return list(replies)


#: Asynchronous replication, Redis's default: no write waits for a replica.
NO_WAIT = Replicas()
