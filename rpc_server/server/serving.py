"""A server process: the app behind the connection guard on listening sockets, and its drain.

Where it sits: ``rpc-server serve`` (``rpc_server.cli``) with one worker calls
``run_server``, which binds the address itself; with several, each gunicorn worker
(``rpc_server.server.gunicorn_worker``) calls ``start_serving`` and ``drain`` on the sockets
gunicorn's arbiter bound. Either way a process is a whole server (its own pool and
receipt deliverer).

Each listening socket is served by an asyncio server (``loop.create_server(sock=…)``)
whose connections go through a ``ConnectionGuard`` (``rpc_server.server.connection_limits``:
the connection cap and the read deadline) to aiohttp's protocol (``AppRunner.server``);
aiohttp's own keep-alive timeout closes idle connections, and its protocol logs through
``client_faults.server_logger``. aiohttp's sites take its protocol factory as it is, so
they would bypass the guard: that is why the asyncio server is ours.

The asyncio server is given a duplicate of the listening socket, and this module keeps
the original: closing the server stops the accepting (asyncio's public ``Server.close``)
while the socket itself stays open, so that at shutdown the connections already queued
in the kernel can be taken and served, not reset (see ``drain``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from rpc_server.app import METRICS, SHUTDOWN, create_app
from rpc_server.config import Settings
from rpc_server.http import access_log
from rpc_server.server import client_faults, connection_limits
from rpc_server.server.connection_limits import ConnectionGuard
from rpc_server.server.in_flight import InFlight
from rpc_server.server.listening import BACKLOG, bind_listeners

log = logging.getLogger("rpc_server.server.serving")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# At most this many queued connections are taken over at shutdown (the kernel's accept
# queue of one listening socket holds at most its backlog).
MAX_TAKEN_CONNECTIONS = 1024
# At shutdown, how long the listening socket stays open (not accepted from) for the
# handshakes under way to complete before it closes (see ``drain``).
HANDSHAKE_GRACE_SECONDS = 0.05


def run_server(settings: Settings, host: str, port: int) -> None:
    """Serve ``host:port`` in this process until SIGTERM/SIGINT, then drain.

    Raises OSError if the address cannot be bound (before the app starts)."""
    listeners = bind_listeners(host, port)
    asyncio.run(serve_until_signalled(settings, listeners))


async def serve_until_signalled(settings: Settings, listeners: Sequence[socket.socket]) -> None:
    # The handlers come first: a signal while the app starts waits for it, then drains.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    serving = await start_serving(create_app(settings), settings, listeners)
    tune_garbage_collector()
    await stopping.wait()
    await drain(serving, settings)


@dataclass(frozen=True)
class Serving:
    """A server that has started: its asyncio servers and the listening sockets they
    accept from, the guard of its connections, the count of its requests in flight, and
    aiohttp's runner."""

    servers: list[asyncio.Server]
    listeners: list[socket.socket]
    guard: ConnectionGuard
    in_flight: InFlight
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.listeners[0].getsockname()[1])

    def stop_listening(self) -> None:
        for server in self.servers:
            server.close()
        for listener in self.listeners:
            listener.close()

    async def close(self) -> None:
        """Stop at once (no drain): for tests; ``drain`` is the graceful way."""
        self.stop_listening()
        await self.runner.cleanup()


async def start_serving(
    app: web.Application, settings: Settings, listeners: Sequence[socket.socket]
) -> Serving:
    """Serve ``app`` on ``listeners`` (listening sockets; from now on the Serving's), every
    connection through a ``ConnectionGuard``, requests logged by our access log; return
    once accepting."""
    in_flight = InFlight()
    app.middlewares.append(in_flight.middleware)
    # Outermost: it sees the answer as it goes out, whichever middleware made it.
    app.middlewares.insert(0, connection_limits.middleware)
    runner = web.AppRunner(
        app,
        access_log=access_log.LOGGER if settings.access_log else None,
        access_log_class=access_log.AccessLogger,
        access_log_format=access_log.log_format_for(settings.log_format),
        shutdown_timeout=settings.shutdown_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        logger=client_faults.server_logger(),
    )
    await runner.setup()
    assert runner.server is not None  # set up
    metrics = app.get(METRICS)
    guard = ConnectionGuard(
        runner.server,
        read_timeout=settings.read_timeout,
        max_connections=settings.max_connections,
        on_refusal=None if metrics is None else metrics.observe_refusal,
    )
    loop = asyncio.get_running_loop()
    servers = []
    for listener in listeners:
        listener.setblocking(False)  # shared with its duplicate: accepts never block
        servers.append(
            await loop.create_server(guard.protocol, sock=listener.dup(), backlog=BACKLOG)
        )
    return Serving(servers, list(listeners), guard, in_flight, runner)


# Container allocations (less deallocations) between young-generation collections;
# CPython's default is 700. The older generations keep their default ratios.
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """For a server process once its app is serving (``rpc-server serve``, and each
    gunicorn worker; not an app started in a test's process). What it built at startup
    (modules, schemas, compiled statements, the OpenRPC document) is moved out of the
    collector's way (``gc.freeze``), and the young generation is collected every
    ``GC_YOUNG_THRESHOLD`` allocations rather than every 700. A request allocates
    hundreds of short-lived containers and a batch thousands, nearly all freed by
    reference counting; at 700 the collector ran several times per batch for little.
    Measured on SQLite (``tests/benchmarks/profile.md``): server CPU per batch of 50
    ``purchase.get`` about 11 % lower, per single call about 10 %, peak RSS unchanged."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def drain(serving: Serving, settings: Settings) -> None:
    """Stop accepting, finish the calls in flight within ``RPC_SERVER_SHUTDOWN_TIMEOUT``,
    then stop the app (its deliverer and pool).

    The drain is ours, not aiohttp's: aiohttp's shutdown marks every connection as
    closing and drops the rest of a request body that is still arriving. So first the
    listener closes (new connections are refused), then the calls in flight finish,
    bodies and all, and only then does aiohttp close the idle connections and the app
    stop its deliverer and pool.

    Closing a listening socket resets the connections the kernel has completed but the
    server not yet accepted, and their clients may have written a request already. So
    the asyncio servers stop accepting first, the queue is taken (``take_queued``) and
    served like any other connection, and the socket closes only after
    ``HANDSHAKE_GRACE_SECONDS``: a handshake under way completes in the kernel a moment
    later (under load the loopback's packet processing can lag by milliseconds), and its
    client may already have written a request. What arrived meanwhile is taken and
    served too; then the socket closes and new connections are refused (with several
    workers, once every worker, and gunicorn's arbiter, has closed its copy).
    """
    loop = asyncio.get_running_loop()
    serving.runner.app[SHUTDOWN].deadline = loop.time() + settings.shutdown_timeout
    serving.in_flight.closing = True  # answers from now on end their connection
    for server in serving.servers:
        server.close()  # no more accepting; the listening sockets stay open
    await serve_taken(take_queued(serving.listeners), serving.guard)
    await asyncio.sleep(HANDSHAKE_GRACE_SECONDS)
    taken = take_queued(serving.listeners)
    serving.stop_listening()
    await serve_taken(taken, serving.guard)
    try:
        await asyncio.wait_for(serving.in_flight.settled(), timeout=settings.shutdown_timeout)
    except TimeoutError:
        log.warning("%d call(s) still running at the shutdown timeout", serving.in_flight.count)
    await serving.runner.cleanup()


def take_queued(listeners: Sequence[socket.socket]) -> list[socket.socket]:
    """The connections waiting in the accept queues of ``listeners`` (non-blocking
    sockets nobody else accepts from any more), taken in one go (no await)."""
    taken: list[socket.socket] = []
    for listener in listeners:
        while len(taken) < MAX_TAKEN_CONNECTIONS:
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break  # the queue is empty
            except ConnectionAbortedError:
                continue  # reset by its client while queued
            except OSError as exc:  # out of descriptors, say: serve what was taken
                log.warning("shutting down: cannot take queued connections: %s", exc)
                break
            connection.setblocking(False)
            taken.append(connection)
    return taken


async def serve_taken(connections: list[socket.socket], guard: ConnectionGuard) -> None:
    if connections:
        log.info("shutting down: serving %d connection(s) that were still queued", len(connections))
    loop = asyncio.get_running_loop()
    for connection in connections:
        await loop.connect_accepted_socket(guard.protocol, connection)
