"""One of several server processes: a gunicorn worker that serves the app as one process does.

Where it sits: ``rpc-server serve --workers N`` runs gunicorn's arbiter
(``rpc_server.server.worker_pool``), which binds the address and forks N workers of this class;
each serves the sockets it inherited with ``rpc_server.server.serving`` (its own app, pool and
receipt deliverer) and drains there on SIGTERM, exactly as ``rpc-server serve`` with one
process does. The arbiter restarts a worker that dies, and stops them on SIGTERM.

Why not ``aiohttp.GunicornWebWorker``: it serves in ``_run`` (private), on aiohttp's
``SockSite``, which takes aiohttp's protocol factory as it is (no connection guard: no
cap, no read deadline), and it stops with ``AppRunner.cleanup``, aiohttp's shutdown,
which drops a request body still arriving. None of that can be changed through its
public surface. So this subclasses the base gunicorn documents for custom workers
(``gunicorn.workers.base.Worker``: ``init_process``, ``init_signals``, ``run``,
``notify``, ``sockets``, ``alive``, ``booted``, ``ppid``, ``wsgi``) and runs our serving
code on the sockets gunicorn gives it (``self.sockets[i].sock``).

Signals: SIGTERM, SIGINT and SIGQUIT all drain (gunicorn's arbiter turns a SIGINT into a
SIGQUIT to its workers, and ``rpc-server serve`` promises a drain on SIGINT); the
arbiter's ``graceful_timeout`` (``RPC_SERVER_SHUTDOWN_TIMEOUT`` and a margin) bounds
it with SIGKILL. A stop signal sent while the worker is being forked is not lost:
``worker_pool`` blocks them around the fork, and ``init_signals`` unblocks them once
its handlers are in place (a pending one is then delivered to them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web
from gunicorn.workers.base import Worker  # type: ignore[import-untyped]

from rpc_server.app import SETTINGS
from rpc_server.server.serving import drain, start_serving, tune_garbage_collector

log = logging.getLogger("rpc_server.server.gunicorn_worker")

# The signals that stop a worker (each with a drain); blocked around the fork.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# How often the worker tells the arbiter it is alive (gunicorn's ``timeout`` is 30 s);
# aiohttp's own gunicorn worker does it every second too.
HEARTBEAT_SECONDS = 1.0

AppFactory = Callable[[], web.Application]


class ServerWorker(Worker):  # type: ignore[misc]  # gunicorn is untyped
    """A gunicorn worker serving ``self.wsgi()`` (the app factory of ``worker_pool``)."""

    # Set by gunicorn's Worker (False once told to stop), declared for the type checker.
    alive: bool
    booted: bool

    def init_signals(self) -> None:
        super().init_signals()
        # gunicorn's SIGINT/SIGQUIT handler exits at once; ours drain as SIGTERM does.
        # Until the event loop runs, the handler only marks the worker as stopping.
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle_exit)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def run(self) -> None:
        # gunicorn marks the worker booted before ``run``; here booting (the app's start,
        # its database) is still to come, and a failure there is a boot failure: the
        # arbiter then stops, rather than restarting workers that cannot start. As
        # aiohttp's worker does.
        self.booted = False
        asyncio.run(self.serve())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stopping.set)
        if not self.alive:  # told to stop while starting: start, then drain at once
            stopping.set()
        heartbeat = asyncio.create_task(self.beat(stopping), name="gunicorn-heartbeat")
        try:
            make_app: AppFactory = self.wsgi
            app = make_app()
            settings = app[SETTINGS]
            serving = await start_serving(
                app, settings, [listener.sock for listener in self.sockets]
            )
            tune_garbage_collector()
            self.booted = True
            log.info("worker %d serving", os.getpid())
            await stopping.wait()
            self.alive = False
            await drain(serving, settings)
        finally:
            heartbeat.cancel()

    async def beat(self, stopping: asyncio.Event) -> None:
        """Tell the arbiter we are alive; stop if it is gone (we were re-parented)."""
        while True:
            self.notify()
            if os.getppid() != self.ppid and not stopping.is_set():
                log.warning("gunicorn's arbiter (%s) is gone: stopping", self.ppid)
                stopping.set()
            await asyncio.sleep(HEARTBEAT_SECONDS)
