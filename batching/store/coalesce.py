"""The Redis side of ``coalesce=True``: identical requests in flight at once are computed by one claim.

The first claim to hold a request of a given key becomes its owner (``batching:coalesce:<queue>:<key>`` names
it). An identical request claimed elsewhere while that owner's lease runs is moved into the owner's claim: it is a
follower, held under the owner's lease like the owner's own messages, so it is never only in a consumer's memory.
When the owner's batch has run, ``close`` stops new followers from joining and returns them, and the owner stores
their results with its own before it finishes the claim. If the owner dies, its claim — followers included — is
re-queued by the usual lease recovery and runs again. See ``lua/coalesce.lua`` and ``lua/uncoalesce.lua``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .lua import script

if TYPE_CHECKING:
    from .queue import Claim, QueueStore

#: A coalescing key outlives its last use by this many leases; only then is it cleaned up by expiry. Its owner
#: counts only while its lease runs, so this is housekeeping, not what keeps a follower safe.
KEY_LEASES = 2


class CoalesceStore:
    """Joins and closes coalesced computations on one queue, through the queue store's client and keys."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self._join = script(store.client, "coalesce.lua")
        self._close = script(store.client, "uncoalesce.lua")

    def join(self, claim: Claim, requests: Sequence[tuple[str, bytes]]) -> list[bool]:
        """For each ``(key, raw)`` just claimed into ``claim``: True if this claim computes it (it owns the key
        now, or did already), False if it moved into the claim that already computes it."""
        if not requests:
            return []
        keys = self.store.keys
        reply = self._durably(
            self._join, "coalescing a claim",
            keys=[keys.claims, keys.claim(claim.claim_id), *(keys.coalesce(key) for key, _raw in requests)],
            args=[claim.claim_id, int(self.store.lease_s * KEY_LEASES * 1000), keys.claim(""),
                  *(raw for _key, raw in requests)],
        )
        return [bool(int(owned)) for owned in reply]

    def close(self, claim: Claim, owned: Sequence[str]) -> list[bytes]:
        """Release the keys ``claim`` owns and return every raw message it holds, its followers' included (empty
        if the claim is no longer ours)."""
        keys = self.store.keys
        return list(self._durably(self._close, "closing a coalesced computation",
                                  keys=[keys.claims, keys.claim(claim.claim_id), *map(keys.coalesce, owned)],
                                  args=[claim.claim_id]))

    def _durably(self, run: Any, what: str, *, keys: list[str], args: list[Any]) -> Any:
        """Run a script; in durable mode (``wait_replicas``) confirmed by replicas like claims and finishes, or
        ``NotReplicated``. A follower moved between claims, or a computation closed, that a promoted replica never
        saw could otherwise be finished away with a claim that still holds it there. On ``NotReplicated`` the
        caller drops its batch unrun and the claim comes back through its lease, as after any failed claim."""
        replicas = self.store.replicas
        if not replicas:
            return run(keys=keys, args=args)
        (reply,) = replicas.run(self.store.client, lambda pipe: run(keys=keys, args=args, client=pipe),
                                f"{what} of {self.store.keys.queue!r}")
        return reply
