"""Connection limits: a cap on open connections, and a deadline for every request to arrive.

This sits between the listening socket and aiohttp. ``start_serving``
(``rpc_server.server.serving``, in one process or in each gunicorn worker) creates its asyncio
servers with ``ConnectionGuard.protocol`` as the protocol factory; each accepted
connection is a ``GuardedConnection``, which hands every byte on to the protocol aiohttp
makes for it (``AppRunner.server``, aiohttp's public protocol factory) and keeps two
limits aiohttp does not have:

- **The cap** (``RPC_SERVER_MAX_CONNECTIONS``, per process). A connection past it is
  answered at once with HTTP 503 and a JSON-RPC error (``Retry-After: 1``, then
  ``Connection: close``), never read, and closed as soon as its client has read the
  answer (at most ``REFUSAL_LINGER_SECONDS`` later). A clear answer rather than a bare
  close, because a client, or a load balancer in front, can tell "full, retry shortly"
  from a network failure, and the contract says every error is a JSON-RPC error. It
  costs one small write; no aiohttp protocol is made for the connection. Refusals are
  bounded too: past ``max_connections`` of them still lingering, new ones are reset.
- **The read deadline** (``RPC_SERVER_READ_TIMEOUT``). A request must have arrived
  whole, headers and body, within ``read_timeout`` of its first byte (for a connection's
  first request, of the connection's opening). aiohttp has no such timeout: a client
  that stops mid-headers or mid-body (or trickles a byte now and then) would hold its
  connection forever. At the deadline the client gets HTTP 408 with a JSON-RPC error if
  it had started a request, and the connection is closed; one INFO line says so (a
  connection that never sent a byte is closed quietly). A body cut this way ends the
  app's ``read_body`` with a 408 too (``rpc_server.server.client_faults.receiving_body``), which
  is what the access log shows for it.

Between requests a connection is idle, and aiohttp's ``keepalive_timeout``
(``RPC_SERVER_KEEPALIVE_TIMEOUT``) closes it. The middleware below tells each connection
where its request is: the app has it whole (the deadline no longer applies), or answered
it without reading all of its body (the connection then closes after the answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.envelope import error_object, invalid_request
from rpc_server.jsonrpc.errors import SERVICE_UNAVAILABLE

log = logging.getLogger("rpc_server.connections")

# How long a refused connection is kept, at most, for its client to read the 503 (closed
# at once, its unread request could reset the connection before the answer is read).
REFUSAL_LINGER_SECONDS = 1.0
# Refusals are logged at most this often (with how many there were), not one by one.
REFUSAL_LOG_INTERVAL_SECONDS = 10.0

# Where a connection's current request is.
RECEIVING = 0  # its headers are arriving: the deadline runs
BODY = 1  # aiohttp has the headers, the app not yet the whole body: the deadline runs
HANDLING = 2  # the app has the whole request: no deadline
ANSWERED_EARLY = 3  # answered before its body had all arrived: the deadline runs
IDLE = 4  # between requests: aiohttp's keep-alive timer runs
REFUSED = 5  # past the cap: answered 503, closing


def raw_answer(status: int, reason: str, payload: object, *extra_headers: str) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body that closes its connection, as bytes:
    for the moments aiohttp has no request to answer (it is never written beside one)."""
    body = json_codec.dumps(payload)
    head = "\r\n".join(
        (
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
            *extra_headers,
        )
    )
    return head.encode("ascii") + b"\r\n\r\n" + body


def request_timeout_answer(read_timeout: float) -> object:
    """The JSON-RPC error of a request that did not arrive within ``read_timeout``."""
    return invalid_request(f"The request did not arrive within {read_timeout:g} seconds.")


REFUSAL = raw_answer(
    503,
    "Service Unavailable",
    error_object(SERVICE_UNAVAILABLE, "Service unavailable", "Too many open connections."),
    "Retry-After: 1",
)


class ConnectionGuard:
    """The connections of one process: counts them, refuses past the cap, times requests."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        read_timeout: float,
        max_connections: int,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        """``on_refusal``: told why each connection was refused or cut
        (``too_many_connections``, ``read_timeout``): the metrics."""
        self.protocol_factory = protocol_factory
        self.on_refusal = on_refusal
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.open = 0  # connections being served
        self.refusing = 0  # refused connections not yet closed
        self.timeout_answer = raw_answer(
            408, "Request Timeout", request_timeout_answer(read_timeout)
        )
        self._refused_unlogged = 0
        self._refusal_logged_at = float("-inf")

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory to serve with (``loop.create_server(guard.protocol, …)``)."""
        return GuardedConnection(self)

    def note_refusal(self) -> None:
        if self.on_refusal is not None:
            self.on_refusal("too_many_connections")
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL_SECONDS:
            log.warning(
                "refused %d connection(s): %d open, the most RPC_SERVER_MAX_CONNECTIONS allows",
                self._refused_unlogged,
                self.open,
            )
            self._refused_unlogged = 0
            self._refusal_logged_at = now


class GuardedConnection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol for it, and the limits around it."""

    __slots__ = (
        "_bytes_while_handling",
        "_counted",
        "_deadline",
        "_guard",
        "_inner",
        "_loop",
        "_received",
        "_state",
        "_timer",
        "_transport",
        "timed_out",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._state = RECEIVING
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._received = 0  # bytes of the current request so far (for the log line)
        self._bytes_while_handling = False
        # Whether it counts against max_connections (a WebSocket stops counting).
        self._counted = False
        # Closed because its request did not arrive in time (read by receiving_body).
        self.timed_out = False

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        guard = self._guard
        if guard.open >= guard.max_connections:
            self._refuse(transport)
            return
        guard.open += 1
        self._counted = True
        self._arm()
        self._inner = guard.protocol_factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == IDLE:  # the first bytes of the next request
            self._state = RECEIVING
            self._received = 0
            self._arm()
        elif state == HANDLING:
            self._bytes_while_handling = True  # a pipelined request: timed once answered
        elif state == REFUSED:
            return  # never read
        self._received += len(data)
        assert self._inner is not None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None  # refused: close
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == REFUSED:
            self._guard.refusing -= 1
            return
        if self._counted:
            self._guard.open -= 1
        assert self._inner is not None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # --- where the request is (told by ``middleware`` and ``receiving_body``) -------

    def request_arrived(self, body_complete: bool) -> None:
        """aiohttp parsed a request's headers and calls the app with it."""
        self._state = HANDLING if body_complete else BODY
        if body_complete:
            self._deadline = None

    def body_received(self) -> None:
        """The app has read the whole body: the request has arrived."""
        if self._state == BODY:
            self._state = HANDLING
            self._deadline = None

    def request_answered(self, body_complete: bool) -> bool:
        """The app answered; return False if the connection must close after the answer
        (its body is still arriving, and it must not take longer than its deadline)."""
        if self._state == BODY and not body_complete:
            self._state = ANSWERED_EARLY
            return False
        if self._state in (BODY, HANDLING):
            self._state = IDLE
            self._deadline = None
            if self._bytes_while_handling:
                self._bytes_while_handling = False
                self._state = RECEIVING
                self._received = 0
                self._arm()
        return True

    def became_websocket(self) -> None:
        """The connection was upgraded to a WebSocket (``rpc_server.live``): it no longer
        counts against ``RPC_SERVER_MAX_CONNECTIONS`` (WebSockets have their own cap,
        ``RPC_SERVER_WS_MAX_CONNECTIONS``), so held-open sockets never starve HTTP calls."""
        if self._counted:
            self._counted = False
            self._guard.open -= 1

    # --- the deadline ---------------------------------------------------------------

    def _arm(self) -> None:
        self._deadline = self._loop.time() + self._guard.read_timeout
        # One timer per connection, moved on lazily when it fires early: arming for each
        # request costs no timer handle.
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self.timed_out = True
        peer = transport.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) else "-"
        if self._state == RECEIVING and self._received == 0:
            # Opened and never used: nothing to answer, nothing worth an INFO line.
            log.debug(
                "closed a connection from %s: no request in %gs", remote, self._guard.read_timeout
            )
        else:
            log.info(
                "closed a connection from %s: its request did not arrive within %gs "
                "(%d bytes came)",
                remote,
                self._guard.read_timeout,
                self._received,
            )
            if self._state in (RECEIVING, BODY):  # nothing answered yet: say why
                transport.write(self._guard.timeout_answer)
                if self._guard.on_refusal is not None:
                    self._guard.on_refusal("read_timeout")
        transport.close()

    # --- past the cap ---------------------------------------------------------------

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._state = REFUSED
        guard = self._guard
        guard.refusing += 1
        guard.note_refusal()
        if guard.refusing > guard.max_connections:
            transport.abort()  # a flood of refusals: do not hold a descriptor for each
            return
        transport.write(REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()  # the answer is whole; the client closes when it has read it
        self._timer = self._loop.call_later(REFUSAL_LINGER_SECONDS, transport.close)


def connection_of(request: web.BaseRequest) -> GuardedConnection | None:
    """The guarded connection ``request`` came on; None if not served by a guard (tests
    that build the app alone) or if the connection is already gone."""
    transport = request.transport
    if transport is None:
        return None
    protocol = transport.get_protocol()
    return protocol if isinstance(protocol, GuardedConnection) else None


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the request's connection when its request has arrived and been answered."""
    connection = connection_of(request)
    if connection is None:
        return await handler(request)
    connection.request_arrived(request.content.is_eof())
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if not connection.request_answered(request.content.is_eof()):
            exc.force_close()
        raise
    except BaseException:
        connection.request_answered(request.content.is_eof())
        raise
    if not connection.request_answered(request.content.is_eof()):
        response.force_close()
    return response
