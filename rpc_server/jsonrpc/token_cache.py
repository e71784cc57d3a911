"""What this process remembers about the tokens it has looked up, so most requests skip
the lookup. The call context (``rpc_server.jsonrpc.context``) asks it before the database.

- **Buyer tokens** that authenticated are trusted for ``RPC_SERVER_TOKEN_CACHE_SECONDS``
  (default 5), never past the token's own ``expires_at``: revoking a buyer token takes
  effect within that window. **Staff and payments tokens are never trusted from memory**:
  they are looked up on every request, so revoking one, or its expiry, takes effect at
  once.
- **Unknown tokens** (no such token, expired or revoked) are remembered as unknown for
  ``unknown_seconds`` (default 10): a client repeating a bad token costs one lookup per
  10 s, not one per request. A token cannot turn good in the meantime (tokens are random;
  only the fixed demo tokens could be tried before ``seed-demo`` stores them, and they
  then work at most 10 s later). A failed lookup (database unreachable) is not remembered.
- **Tokens that have authenticated** here at least once are remembered without trust:
  they are looked up like any other, but are never refused a lookup because their client
  address is over its limit (``rpc_server.jsonrpc.rate_limit``).

Everything is keyed by the token's hash and bounded in size (the least recently used
entries are forgotten first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from rpc_server.domain.records import Actor
from rpc_server.domain.states import Scope

UNKNOWN_SECONDS = 10.0
V = TypeVar("V")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ActorCache:
    def __init__(
        self,
        ttl_seconds: float,
        *,
        unknown_seconds: float = UNKNOWN_SECONDS,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
    ):
        self.ttl, self.unknown_seconds, self.max_entries = ttl_seconds, unknown_seconds, max_entries
        self.clock, self.wall_clock = clock, wall_clock
        # token hash -> (trusted until, on ``clock``; the actor)
        self._actors: OrderedDict[str, tuple[float, Actor]] = OrderedDict()
        # token hash -> known to be unknown until (on ``clock``)
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._authenticated: OrderedDict[str, None] = OrderedDict()
        # Token lookups sent to the database (by the call context), those that found no
        # live token, and requests spared a lookup by an unknown entry.
        self.lookups = 0
        self.failed_lookups = 0
        self.unknown_hits = 0

    def get(self, token_hash: str) -> Actor | None:
        """The holder of a token still trusted from memory, or None (look it up)."""
        entry = self._actors.get(token_hash)
        if entry is None:
            return None
        until, actor = entry
        if until <= self.clock():
            del self._actors[token_hash]
            return None
        return actor

    def put(self, token_hash: str, actor: Actor) -> None:
        """Remember that ``token_hash`` authenticated as ``actor`` (trusted if a buyer's)."""
        self._unknown.pop(token_hash, None)
        self._remember(self._authenticated, token_hash, None)
        if actor.scope is not Scope.BUYER or self.ttl <= 0:
            return
        trusted_for = self.ttl
        if actor.token_expires_at is not None:
            trusted_for = min(
                trusted_for, (actor.token_expires_at - self.wall_clock()).total_seconds()
            )
        if trusted_for > 0:
            self._remember(self._actors, token_hash, (self.clock() + trusted_for, actor))

    def put_unknown(self, token_hash: str) -> None:
        """Remember that ``token_hash`` did not authenticate (a failed lookup)."""
        self.failed_lookups += 1
        self._actors.pop(token_hash, None)
        if self.unknown_seconds > 0:
            self._remember(self._unknown, token_hash, self.clock() + self.unknown_seconds)

    def is_unknown(self, token_hash: str) -> bool:
        """Whether ``token_hash`` failed to authenticate within ``unknown_seconds``."""
        until = self._unknown.get(token_hash)
        if until is None:
            return False
        if until <= self.clock():
            del self._unknown[token_hash]
            return False
        return True

    def has_authenticated(self, token_hash: str) -> bool:
        """Whether ``token_hash`` has authenticated in this process (no trust implied)."""
        return token_hash in self._authenticated

    def _remember(self, entries: OrderedDict[str, V], key: str, value: V) -> None:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
