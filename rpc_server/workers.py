"""Serving: one process, or N worker processes sharing the port with SO_REUSEPORT.

Each worker is a whole server (its own pool and receipt deliverer); the kernel spreads
connections over them. The parent only supervises: it restarts a worker that dies, and
on SIGTERM or SIGINT passes SIGTERM on and waits, so every worker finishes its in-flight
calls (aiohttp's graceful shutdown, bounded by ``RPC_SERVER_SHUTDOWN_TIMEOUT``).

A worker listens with its own asyncio server, whose connections go through a
``ConnectionGuard`` (``rpc_server.connection_limits``: the connection cap and the read
deadline) to aiohttp's protocol (``AppRunner.server``); aiohttp's own keep-alive timeout
closes idle connections, and its protocol logs through ``client_faults.server_logger``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from aiohttp import web
from aiohttp.typedefs import Handler

from rpc_server import access_log, client_faults, connection_limits
from rpc_server.app import SHUTDOWN, create_app
from rpc_server.config import Settings
from rpc_server.connection_limits import ConnectionGuard

log = logging.getLogger("rpc_server.workers")

# The listening socket's accept queue (aiohttp's TCPSite default).
BACKLOG = 128
# At most this many queued connections are taken over at shutdown (the kernel's accept
# queue of one listening socket holds at most its backlog).
MAX_TAKEN_CONNECTIONS = 1024
# At shutdown, how long the listening socket stays open (not accepted from) for the
# handshakes under way to complete before it closes (see ``serve``).
HANDSHAKE_GRACE_SECONDS = 0.05


def run_server(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    asyncio.run(serve(settings, host, port, reuse_port=reuse_port))


async def serve(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; then drain within ``RPC_SERVER_SHUTDOWN_TIMEOUT``.

    The drain is ours, not aiohttp's: aiohttp's shutdown marks every connection as
    closing and drops the rest of a request body that is still arriving. So first the
    listener closes (new connections are refused), then the calls in flight finish,
    bodies and all, and only then does aiohttp close the idle connections and the app
    stop its deliverer and pool.
    """
    app = create_app(settings)
    serving = await start_serving(app, settings, host, port, reuse_port=reuse_port)
    server, guard, in_flight = serving.server, serving.guard, serving.in_flight
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if _stop_requested_early:
        stopping.set()  # told to stop while still starting: stop now, cleanly
    await stopping.wait()

    deadline = loop.time() + settings.shutdown_timeout
    app[SHUTDOWN].deadline = deadline
    in_flight.closing = True  # answers from now on end their connection
    await serve_taken(take_accept_queue(server), guard)
    # A handshake under way now completes in the kernel a moment later (under load the
    # loopback's packet processing can lag by milliseconds), and its client may already
    # have written a request: closing the socket now would reset that connection. So it
    # stays open, not accepted from, a little longer, and what arrived meanwhile is taken
    # and served too; then it closes and new connections are refused.
    await asyncio.sleep(HANDSHAKE_GRACE_SECONDS)
    taken = take_accept_queue(server)
    server.close()
    await serve_taken(taken, guard)
    try:
        await asyncio.wait_for(in_flight.settled(), timeout=settings.shutdown_timeout)
    except TimeoutError:
        log.warning("%d call(s) still running at the shutdown timeout", in_flight.count)
    await serving.runner.cleanup()


def take_accept_queue(server: asyncio.Server) -> list[socket.socket]:
    """Stop accepting, and take the connections waiting in the accept queue.

    Closing a listening socket resets the connections the kernel has completed but the
    server not yet accepted, and their clients may have written a request already (with
    ``--workers``, each worker's socket has its own queue). So before the socket closes
    the loop stops accepting and the queue is emptied here, in one go (no await);
    ``serve`` calls this again just before closing the socket, for what arrived since,
    and ``serve_taken`` hands the connections to aiohttp like any other.
    """
    loop = asyncio.get_running_loop()
    taken: list[socket.socket] = []
    for listening in server.sockets:
        loop.remove_reader(listening.fileno())
        # A duplicate of the descriptor: the same listening socket, closed on its own.
        with socket.socket(fileno=os.dup(listening.fileno())) as queue:
            queue.setblocking(False)
            while len(taken) < MAX_TAKEN_CONNECTIONS:
                try:
                    connection, _ = queue.accept()
                except (BlockingIOError, InterruptedError):
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


@dataclass(frozen=True)
class Serving:
    """A server that has started: its asyncio server, the guard of its connections, the
    count of its requests in flight, and aiohttp's runner."""

    server: asyncio.Server
    guard: ConnectionGuard
    in_flight: InFlight
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop at once (no drain): for tests; ``serve`` drains first."""
        self.server.close()
        await self.runner.cleanup()


async def start_serving(
    app: web.Application, settings: Settings, host: str, port: int, *, reuse_port: bool = False
) -> Serving:
    """Serve ``app`` on ``host:port`` (0: any free port), every connection through a
    ``ConnectionGuard``, requests logged by our access log; return once listening."""
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
    guard = ConnectionGuard(
        runner.server,
        read_timeout=settings.read_timeout,
        max_connections=settings.max_connections,
    )
    # Served by our own asyncio server (aiohttp's sites take its protocol factory as it
    # is): every connection goes through the guard.
    server = await asyncio.get_running_loop().create_server(
        guard.protocol, host, port, reuse_port=reuse_port, backlog=BACKLOG
    )
    return Serving(server, guard, in_flight, runner)


class InFlight:
    """Counts requests being handled, so shutdown can wait until there are none."""

    # After the last call ends, how long a keep-alive connection gets to deliver a request
    # its client had already written (it is still in the socket, not yet counted).
    GRACE_SECONDS = 0.2

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            response = await handler(request)
            if self.closing:
                # "Connection: close": the client sends nothing more on this connection.
                response.force_close()
            return response
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def settled(self) -> None:
        """Return once no call has been running for ``GRACE_SECONDS``."""
        while True:
            await self._idle.wait()
            await asyncio.sleep(self.GRACE_SECONDS)
            if self.count == 0:
                return


# Set by a SIGTERM/SIGINT that arrives before ``serve`` has its own handlers (a worker
# still importing or building its app): the worker then starts, and stops at once with
# exit status 0, instead of dying of the signal.
_stop_requested_early = False
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _request_stop_early(signum: int, frame: FrameType | None) -> None:
    global _stop_requested_early
    _stop_requested_early = True


def _worker_main(settings: Settings, host: str, port: int) -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _request_stop_early)
    # Blocked by the supervisor while it started us (see ``supervise``); one that came
    # in the meantime is delivered now, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    from rpc_server.cli import configure_logging  # the child starts with fresh logging

    configure_logging(settings.log_level, settings.log_format)
    run_server(settings, host, port, reuse_port=True)


def supervise(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run ``workers`` server processes until told to stop; return the exit status."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker_main, args=(settings, host, port), daemon=False)
        # The child inherits the signal mask: a SIGTERM sent before it has a handler
        # waits, blocked, instead of killing it half-started. The first start of a spawn
        # context launches multiprocessing's resource tracker, and that launch unblocks
        # SIGTERM and SIGINT (it blocks them around its own spawn): so the tracker is
        # started first, outside the block.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        log.info("worker %s started", process.pid)
        return process

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: graceful shutdown in the worker

    running = [start() for _ in range(workers)]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failed = False
    while running:
        wait([process.sentinel for process in running])
        for process in [p for p in running if not p.is_alive()]:
            running.remove(process)
            if stopping:
                if process.exitcode != 0:
                    log.error("worker %s exited (%s) while stopping", process.pid, process.exitcode)
                    failed = True
            else:
                log.error("worker %s exited (%s); starting another", process.pid, process.exitcode)
                running.append(start())
    return 1 if failed else 0
