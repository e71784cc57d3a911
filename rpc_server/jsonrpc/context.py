"""The per-request context jsonrpcserver passes as every method's first argument.

It carries a unit-of-work factory (never a session: batch items run concurrently and
each opens its own transaction), the frontend links, the payment-event verifier, the
caller's token and the client's address. The token is looked up at most once per HTTP
request, however many batch items need it, and not at all when this process remembers
it (``rpc_server.jsonrpc.token_cache``). The rate limits
(``rpc_server.jsonrpc.rate_limit``) identify the caller through it first, before any
call runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rpc_server.domain import services
from rpc_server.domain.errors import Unauthenticated
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.ports import PaymentVerifier, UnitOfWorkFactory
from rpc_server.domain.records import Actor, UpdateScope
from rpc_server.domain.tokens import hash_token
from rpc_server.jsonrpc.batch_deadline import BatchDeadline
from rpc_server.jsonrpc.call_timer import CallTimer
from rpc_server.jsonrpc.token_cache import ActorCache
from rpc_server.log_throttle import ThrottledLog

if TYPE_CHECKING:  # neither is imported before it is needed (rpc_server.observability)
    from rpc_server.observability.metrics import Metrics
    from rpc_server.observability.tracing import Tracing

log = logging.getLogger("rpc_server.auth")

AMBIGUOUS_CREDENTIALS = (
    "Unauthenticated: the request has more than one Authorization header; send exactly one"
)


def failed_logins_log(interval: float = 60.0) -> ThrottledLog:
    """The app-wide log of failed authentications: one INFO line per client per interval."""
    return ThrottledLog(log, logging.INFO, interval=interval)


class LiveSession(Protocol):
    """The WebSocket connection a call came on (``rpc_server.live``), as methods see it."""

    def authenticated(self, token: str, actor: Actor) -> None:
        """From now on the connection acts for ``actor``; raises Conflict if it already
        acts for someone."""

    async def ready(self) -> None:
        """Return once subscriptions can be opened; raises Unavailable if they cannot
        (the database has been down since this process started)."""

    def subscribe(self, actor: Actor, scope: UpdateScope, since: int | None) -> str:
        """Open a subscription; return its id. Raises Conflict past the cap."""
        ...

    def unsubscribe(self, subscription_id: str) -> bool:
        """End a subscription of this connection; False if it has none of that id."""
        ...


@dataclass
class RpcContext:
    uow: UnitOfWorkFactory
    links: FrontendLinks
    # Checks payment proofs (rpc_server.payment_signatures).
    payments: PaymentVerifier
    token: str | None = None
    # Several Authorization headers (rpc_server.jsonrpc.credentials): every call answers 401.
    ambiguous_credentials: bool = False
    # The client's address, as rpc_server.http.client_address names it (limits and logs).
    client: str = "unknown"
    call_timeout: float = 30.0
    # What cuts a single call past call_timeout: the app's one (rpc_server.jsonrpc.call_timer).
    call_timer: CallTimer = field(default_factory=CallTimer)
    # Open (pending) purchases one user may hold at once (None: no cap).
    max_pending_purchases: int | None = None
    # A batch's deadline, which cuts every call still running (rpc_server.jsonrpc.batch_deadline).
    batch_deadline: BatchDeadline | None = None
    # The OpenRPC document, for rpc.discover (serialized once: a JSON fragment).
    service_description: Any = None
    # What this process remembers of tokens (None: always look up).
    actors: ActorCache | None = None
    # Failed authentications, at most one line per client per interval (None: every one).
    failed_logins: ThrottledLog | None = None
    # The WebSocket connection the call came on (None: over HTTP).
    live: LiveSession | None = None
    # Where calls are counted and traced (rpc_server.observability; None: off).
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    # The caller once known (``_settled``); else the lookup under way (shared by a batch).
    _known: Actor | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)
    _lookup_task: asyncio.Task[Actor | None] | None = field(default=None, repr=False)
    _token_hash: str | None = field(default=None, repr=False)

    async def authenticate(self) -> Actor | None:
        """Return the caller, or None without a valid token; one lookup per request.

        Raises Unauthenticated when the credentials are ambiguous (so that no call runs,
        not even one that needs no token), and the lookup's own errors (database down).
        """
        if self.ambiguous_credentials:
            raise Unauthenticated(AMBIGUOUS_CREDENTIALS)
        return await self.identify()

    async def identify(self) -> Actor | None:
        """Return the caller, or None: no token, ambiguous credentials, or a token that
        does not authenticate. Raises what the lookup raises (database unavailable)."""
        if self._settled or self.token is None or self.ambiguous_credentials:
            return self._known
        if self._lookup_task is None:
            token_hash = self.token_hash()
            if self.actors is not None:
                if (cached := self.actors.get(token_hash)) is not None:
                    return self._settle(cached)
                if self.actors.is_unknown(token_hash):
                    self.actors.unknown_hits += 1
                    self._log_failure(token_hash)
                    return self._settle(None)
            self._lookup_task = asyncio.ensure_future(self._lookup(self.token, token_hash))
        # Shielded: one item's cancellation (its timeout) must not cancel the others' lookup.
        return self._settle(await asyncio.shield(self._lookup_task))

    def authenticated_as(self, token: str, actor: Actor) -> None:
        """The caller is ``actor``, holder of ``token`` (rpc.authenticate checked it):
        the calls of this request not yet identified act for it."""
        self.token, self.ambiguous_credentials = token, False
        if not self._settled and self._lookup_task is None:
            self._settle(actor)

    def token_is_new(self) -> bool:
        """Whether identifying the caller would send a token this process knows nothing
        of (neither trusted, known unknown, nor ever authenticated here) to the database.

        A token this process trusts identifies the caller here and now (``identify``
        then answers without looking in the cache again)."""
        if self.token is None or self.ambiguous_credentials:
            return False
        if self._settled or self._lookup_task is not None:
            return False  # known, or already being looked up
        if self.actors is None:
            return True
        token_hash = self.token_hash()
        if (cached := self.actors.get(token_hash)) is not None:
            self._settle(cached)
            return False
        return not (self.actors.is_unknown(token_hash) or self.actors.has_authenticated(token_hash))

    def token_hash(self) -> str:
        assert self.token is not None
        if self._token_hash is None:
            self._token_hash = hash_token(self.token)
        return self._token_hash

    def _settle(self, actor: Actor | None) -> Actor | None:
        self._known, self._settled = actor, True
        return actor

    async def _lookup(self, token: str, token_hash: str) -> Actor | None:
        if self.actors is not None:
            self.actors.lookups += 1
        actor = await services.authenticate(self.uow, token)
        if self.actors is not None:
            if actor is None:
                self.actors.put_unknown(token_hash)
            else:
                self.actors.put(token_hash, actor)
        if actor is None:
            self._log_failure(token_hash)
        return actor

    def _log_failure(self, token_hash: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_auth_failure("invalid_token")
        # Never the token itself: a short prefix of its hash is enough to correlate. INFO:
        # a bad token is the client's mistake (or an attack the limits absorb), not an
        # operator's problem.
        message = "authentication failed from %s: unknown, expired or revoked token (sha256 %s…)"
        if self.failed_logins is None:
            log.info(message, self.client, token_hash[:12])
        else:
            self.failed_logins.log(self.client, message, self.client, token_hash[:12])
