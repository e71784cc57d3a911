"""The per-request context jsonrpcserver passes as every method's first argument.

It carries a unit-of-work factory (never a session: batch items run concurrently and
each opens its own transaction), the frontend links, the payment-event verifier and the
caller's token. The token
is looked up at most once per HTTP request, however many batch items need it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.ports import PaymentVerifier, UnitOfWorkFactory
from rpc_server.domain.records import Actor
from rpc_server.domain.tokens import hash_token
from rpc_server.token_cache import ActorCache

log = logging.getLogger("rpc_server.auth")


@dataclass
class RpcContext:
    uow: UnitOfWorkFactory
    links: FrontendLinks
    # Checks payment proofs (rpc_server.payment_signatures).
    payments: PaymentVerifier
    token: str | None = None
    call_timeout: float = 30.0
    # The OpenRPC document, for rpc.discover (serialized once: a JSON fragment).
    service_description: Any = None
    # Recently authenticated tokens (None: always look up).
    actors: ActorCache | None = None
    # The caller once known; else the lookup under way (shared by a batch's items).
    _known: Actor | None = field(default=None, repr=False)
    _lookup_task: asyncio.Task[Actor | None] | None = field(default=None, repr=False)

    async def authenticate(self) -> Actor | None:
        """Return the caller, or None without a valid token; one lookup per request."""
        if self._known is not None or self.token is None:
            return self._known
        if self._lookup_task is None:
            token_hash = hash_token(self.token)
            if self.actors is not None and (cached := self.actors.get(token_hash)) is not None:
                self._known = cached
                return cached
            self._lookup_task = asyncio.ensure_future(self._lookup(self.token, token_hash))
        # Shielded: one item's cancellation (its timeout) must not cancel the others' lookup.
        actor = await asyncio.shield(self._lookup_task)
        self._known = actor
        return actor

    async def _lookup(self, token: str, token_hash: str) -> Actor | None:
        actor = await services.authenticate(self.uow, token)
        if actor is not None and self.actors is not None:
            self.actors.put(token_hash, actor)
        if actor is None:
            # Never the token itself: a short prefix of its hash is enough to correlate.
            log.warning(
                "authentication failed: unknown, expired or revoked token (sha256 %s…)",
                token_hash[:12],
            )
        return actor
