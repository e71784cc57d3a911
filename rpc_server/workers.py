"""Serving: one process, or N worker processes sharing the port with SO_REUSEPORT.

Each worker is a whole server (its own pool and receipt deliverer); the kernel spreads
connections over them. The parent only supervises: it restarts a worker that dies, and
on SIGTERM or SIGINT passes SIGTERM on and waits, so every worker finishes its in-flight
calls (aiohttp's graceful shutdown, bounded by ``RPC_SERVER_SHUTDOWN_TIMEOUT``).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from aiohttp import web

from rpc_server.app import create_app
from rpc_server.config import Settings

log = logging.getLogger("rpc_server.workers")

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-ID}o'


def run_server(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        reuse_port=reuse_port,
        shutdown_timeout=settings.shutdown_timeout,
        print=None,
        access_log_format=ACCESS_LOG_FORMAT,
    )


def _worker_main(settings: Settings, host: str, port: int) -> None:
    from rpc_server.cli import configure_logging  # the child starts with fresh logging

    configure_logging(settings.log_level)
    run_server(settings, host, port, reuse_port=True)


def supervise(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run ``workers`` server processes until told to stop; return the exit status."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker_main, args=(settings, host, port), daemon=False)
        process.start()
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
                failed = failed or process.exitcode != 0
            else:
                log.error("worker %s exited (%s); starting another", process.pid, process.exitcode)
                running.append(start())
    return 1 if failed else 0
