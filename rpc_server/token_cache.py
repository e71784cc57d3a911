"""A short-lived cache of who holds a token, so most requests skip the token lookup.

Only successful lookups are cached, for ``RPC_SERVER_TOKEN_CACHE_SECONDS`` (default 5):
a revoked or expired token stops working within that many seconds, and an unknown token
is looked up every time. Keyed by the token's hash; bounded in size.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from rpc_server.domain.records import Actor


class ActorCache:
    def __init__(self, ttl_seconds: float, *, max_entries: int = 10_000):
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Actor]] = OrderedDict()

    def get(self, token_hash: str) -> Actor | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        expires, actor = entry
        if expires < time.monotonic():
            del self._entries[token_hash]
            return None
        return actor

    def put(self, token_hash: str, actor: Actor) -> None:
        self._entries[token_hash] = (time.monotonic() + self.ttl, actor)
        self._entries.move_to_end(token_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
