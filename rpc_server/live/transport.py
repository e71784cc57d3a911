"""``GET /rpc`` upgraded to a WebSocket: the connection's life, from the handshake to 1001.

Where it sits: the app routes ``GET /rpc`` here (``rpc_server.app``), passing the function
that answers one text frame exactly as ``POST /rpc`` answers a body. This module checks
the handshake (the per-process cap, the ``Authorization`` header), then reads frames
until the peer or the server closes:

- **Authentication**: with a valid bearer token in the header the connection acts for
  its holder from the start; a bad one refuses the upgrade with HTTP 401. Browsers cannot
  send headers: without one, the first call must be ``rpc.authenticate`` within
  ``RPC_SERVER_WS_AUTH_TIMEOUT`` seconds, or the socket is closed with 1008. Never a
  query-string token (it would land in access logs and proxies' logs).
- **Limits**: ``RPC_SERVER_WS_MAX_CONNECTIONS`` per process (HTTP 503 past it), frames up to
  ``RPC_SERVER_MAX_BODY_BYTES`` (larger: closed 1009 by aiohttp), a bounded send queue
  (``rpc_server.live.connection``), aiohttp's heartbeat ping every ``RPC_SERVER_WS_HEARTBEAT``
  seconds (a peer that does not answer is closed).
- **Shutdown**: the server's drain waits for HTTP calls (WebSockets are not counted as
  calls in flight), then ``LiveHub.going_away`` answers each socket's calls under way and
  closes it with 1001.

No Origin check: the API authenticates with bearer tokens, never with cookies, so a page
of another origin opening a socket gains nothing it could not do over CORS-less HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.db.errors import database_unavailable
from rpc_server.domain import services
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import Actor, UpdateScope
from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.context import AMBIGUOUS_CREDENTIALS
from rpc_server.jsonrpc.credentials import read_credentials
from rpc_server.jsonrpc.envelope import error_object
from rpc_server.jsonrpc.errors import SERVICE_UNAVAILABLE, UNAUTHENTICATED
from rpc_server.live.connection import POLICY_VIOLATION, LiveConnection
from rpc_server.live.feed import EventFeed, Subscription
from rpc_server.live.listener import PostgresListener
from rpc_server.server.connection_limits import connection_of

if TYPE_CHECKING:  # imported when used (rpc_server.observability.metrics says why)
    from rpc_server.observability.metrics import Metrics

log = logging.getLogger("rpc_server.live")

# How often the feed reads without being woken: on SQLite, commits made by other
# processes on the same file (the CLI) wake nobody; on PostgreSQL every commit notifies,
# and the poll is a safety net.
POLL_SECONDS = {"sqlite": 1.0, "postgresql": 10.0}

# How long a subscribe waits for a feed that is still starting (the database was down).
FEED_READY_SECONDS = 5.0

AnswerFrame = Callable[[LiveConnection, "MessageScope", bytes], Awaitable[None]]


class MessageScope:
    """One text frame's view of its connection (``RpcContext.live``): it remembers the
    subscriptions the frame's calls open, which begin once the frame's answer is queued."""

    def __init__(self, connection: LiveConnection):
        self.connection = connection
        self.opened: list[Subscription] = []

    def authenticated(self, token: str, actor: Actor) -> None:
        self.connection.authenticated(token, actor)

    async def ready(self) -> None:
        await self.connection.feed.ready(FEED_READY_SECONDS)

    def subscribe(self, actor: Actor, scope: UpdateScope, since: int | None) -> str:
        subscription = self.connection.subscribe(actor, scope, since)
        self.opened.append(subscription)
        return subscription.subscription_id

    def unsubscribe(self, subscription_id: str) -> bool:
        return self.connection.unsubscribe(subscription_id)

    def begin_opened(self) -> None:
        """The frame's answer is queued: its subscriptions' notifications may follow."""
        for subscription in self.opened:
            if not subscription.ended:
                self.connection.feed.begin(subscription)


class LiveHub:
    """This process's live updates: the feed, its PostgreSQL listener, the sockets."""

    def __init__(
        self,
        settings: Settings,
        uow_factory: UnitOfWorkFactory,
        engine: Engine,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.uow = uow_factory
        self.metrics = metrics
        self.feed = EventFeed(
            uow_factory,
            replay_window=settings.ws_replay_window,
            poll_interval=POLL_SECONDS.get(engine.dialect_name, 1.0),
            count_changed=None if metrics is None else metrics.subscription_count,
        )
        connect = getattr(engine, "connect", None)
        self.listener = (
            PostgresListener(connect, self.feed.wake)
            if engine.dialect_name == "postgresql" and connect is not None
            else None
        )
        self.connections: set[LiveConnection] = set()
        # Sockets counted against the cap: open ones and handshakes under way.
        self.admitted = 0
        self._listening: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.feed.start()
        if self.listener is not None:
            self._listening = asyncio.create_task(self.listener.run(), name="live-listener")

    async def going_away(self, budget: float) -> None:
        """Close every socket with 1001, after answering the calls under way."""
        connections = list(self.connections)
        if connections:
            log.info("shutting down: closing %d WebSocket(s)", len(connections))
            await asyncio.gather(*(c.going_away(budget) for c in connections))

    async def stop(self) -> None:
        await self.going_away(budget=1.0)
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        await self.feed.stop()


def _refusal(status: int, code: int, message: str, data: object = None) -> web.Response:
    return web.Response(
        body=json_codec.dumps(error_object(code, message, data)),
        status=status,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


async def _authenticate_upgrade(
    request: web.Request, uow: UnitOfWorkFactory, metrics: Metrics | None
) -> tuple[str | None, Actor | None] | web.Response:
    """The header's token and its holder (both None without a header), or the refusal."""
    credentials = read_credentials(request.headers)
    if credentials.ambiguous:
        if metrics is not None:
            metrics.observe_auth_failure("ambiguous_credentials")
        return _refusal(401, UNAUTHENTICATED, AMBIGUOUS_CREDENTIALS)
    if credentials.token is None:
        return None, None
    try:
        actor = await services.authenticate(uow, credentials.token)
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        return _refusal(503, SERVICE_UNAVAILABLE, "Service unavailable: try again later")
    if actor is None:
        if metrics is not None:
            metrics.observe_auth_failure("invalid_token")
        return _refusal(
            401,
            UNAUTHENTICATED,
            "Unauthenticated: the token is unknown, expired or revoked",
        )
    return credentials.token, actor


async def serve_websocket(
    request: web.Request, hub: LiveHub, answer_frame: AnswerFrame, *, shutdown_budget: float
) -> web.StreamResponse:
    """Run one WebSocket connection on ``request`` until it closes."""
    settings = hub.settings
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat,
        max_msg_size=settings.max_body_bytes,
        # Text frames reach orjson as bytes, undecoded; no permessage-deflate: updates
        # are small, and compressing each for each subscriber costs more CPU than it
        # saves on the wire.
        decode_text=False,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    if hub.admitted >= settings.ws_max_connections:
        return _refusal(
            503, SERVICE_UNAVAILABLE,
            "Service unavailable: too many WebSocket connections to this process; retry",
            {"limit": settings.ws_max_connections},
        )  # fmt: skip
    hub.admitted += 1
    connection: LiveConnection | None = None
    timer: asyncio.TimerHandle | None = None
    try:
        caller = await _authenticate_upgrade(request, hub.uow, hub.metrics)
        if isinstance(caller, web.Response):
            return caller
        token, actor = caller
        await ws.prepare(request)
        if (guarded := connection_of(request)) is not None:
            guarded.became_websocket()  # counted against the WebSocket cap from now on
        connection = LiveConnection(
            ws, request, hub.feed, hub.uow,
            max_subscriptions=settings.ws_max_subscriptions,
            send_queue=settings.ws_send_queue,
            token_recheck=settings.ws_token_recheck,
        )  # fmt: skip
        hub.connections.add(connection)
        if hub.metrics is not None:
            hub.metrics.websocket_count(len(hub.connections))
        if token is not None and actor is not None:
            connection.authenticated(token, actor)
        else:
            timer = asyncio.get_running_loop().call_later(
                settings.ws_auth_timeout, _unless_authenticated, connection, settings
            )
        await connection.receive(lambda body: _answer(connection, body, answer_frame))
    finally:
        hub.admitted -= 1  # first: the handler may be cancelled in the await below
        if timer is not None:
            timer.cancel()
        if connection is not None:
            hub.connections.discard(connection)
            if hub.metrics is not None:
                hub.metrics.websocket_count(len(hub.connections))
            await connection.finish(shutdown_budget)
    return ws


def _unless_authenticated(connection: LiveConnection, settings: Settings) -> None:
    if connection.actor is None:
        connection.close(
            POLICY_VIOLATION,
            f"authentication timed out: call rpc.authenticate within {settings.ws_auth_timeout:g}s",
        )


async def _answer(connection: LiveConnection, body: bytes, answer_frame: AnswerFrame) -> None:
    scope = MessageScope(connection)
    await answer_frame(connection, scope, body)
    scope.begin_opened()
