"""Several server processes: gunicorn's arbiter, run by ``rpc-server serve --workers N``.

Where it sits: ``cmd_serve`` (``rpc_server.cli``) calls ``run_workers`` when N > 1. This
process becomes gunicorn's arbiter (its documented "custom application" API,
``gunicorn.app.base.BaseApplication``): it binds the address, forks N workers
(``rpc_server.server.gunicorn_worker.ServerWorker``), restarts one that dies, and on SIGTERM or
SIGINT closes its copy of the listening socket and tells every worker to drain, waiting
up to ``graceful_timeout`` (``RPC_SERVER_SHUTDOWN_TIMEOUT`` plus ``GRACEFUL_MARGIN_SECONDS``)
before it kills what is left. The workers share the arbiter's listening socket; the
kernel hands each connection to one of them.

gunicorn's own log lines ("Booting worker with pid: …", "Worker (pid:…) was sent
SIGKILL!") go through our logging configuration (``GunicornLog``), one format for all.

Metrics (``rpc_server.observability.metrics``): before it forks, the arbiter points
prometheus-client's multiprocess mode at a fresh private directory (unless
``PROMETHEUS_MULTIPROC_DIR`` is already set: then that one, which the operator empties
between runs), so that any worker answering ``/metrics`` reports every worker's values;
when a worker exits its gauges stop counting (``mark_process_dead``); the arbiter removes
the directory it made when it stops. Nothing in this process imports prometheus-client
before that variable is set (the library reads it once, at import).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from functools import partial
from typing import Any

from aiohttp import web
from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.observability.labels import MULTIPROCESS_DIR_VARIABLE
from rpc_server.server.gunicorn_worker import STOP_SIGNALS, ServerWorker
from rpc_server.server.listening import BACKLOG, listen_addresses

# Beyond the drain's own bound, for a worker's interpreter exit and engine disposal,
# before gunicorn's arbiter kills a worker that is still stopping.
GRACEFUL_MARGIN_SECONDS = 5


def run_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run ``workers`` server processes until SIGTERM/SIGINT; return the exit status
    (0 once stopped; gunicorn's 3 if a worker could not start, 1 if it could not bind)."""
    block_stop_signals_around_forks()
    with metrics_directory(settings.metrics):
        try:
            ServerApplication(settings, host, port, workers).run()
        except SystemExit as exc:  # how gunicorn's arbiter ends, also when all went well
            return exc.code if isinstance(exc.code, int) else 1
    return 0


@contextlib.contextmanager
def metrics_directory(enabled: bool) -> Iterator[None]:
    """prometheus-client's multiprocess directory for the workers (see the module
    docstring): a fresh one made here and removed after, or the operator's own."""
    if not enabled or os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        yield
        return
    directory = tempfile.mkdtemp(prefix="rpc-server-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(directory, ignore_errors=True)


def worker_exited(_arbiter: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: the worker's live gauges stop counting."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def bind_addresses(host: str, port: int) -> list[str]:
    """gunicorn's ``bind`` for ``host:port``: every address it resolves to, as one
    process binds them (``rpc_server.server.listening``)."""
    return [
        f"[{address[0]}]:{address[1]}"
        if family == socket.AF_INET6
        else f"{address[0]}:{address[1]}"
        for family, address in listen_addresses(host, port)
    ]


class ServerApplication(BaseApplication):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn configured from our settings, not from its command line or files."""

    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self.settings = settings
        self.options: dict[str, object] = {
            "bind": bind_addresses(host, port),
            "workers": workers,
            "worker_class": ServerWorker,
            # gunicorn counts whole seconds; the drain itself keeps the exact timeout.
            "graceful_timeout": math.ceil(settings.shutdown_timeout) + GRACEFUL_MARGIN_SECONDS,
            "backlog": BACKLOG,
            "logger_class": GunicornLog,
            "loglevel": settings.log_level.lower(),
            "proc_name": "rpc-server",
            # gunicornc's control socket (one path per user by default: a second server
            # would take it over); we stop and scale by signals.
            "control_socket_disable": True,
            "child_exit": worker_exited,
        }
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> partial[web.Application]:
        """The app factory each worker calls (``ServerWorker.wsgi``)."""
        return partial(create_app, self.settings)


class GunicornLog(Logger):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's logger, writing through the root logger's handlers (ours, set up by
    ``log_output.configure_logging``) instead of its own."""

    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


def block_stop_signals_around_forks() -> None:
    """Block SIGTERM, SIGINT and SIGQUIT while this process forks a worker, in the
    worker until its handlers are in place (``ServerWorker.init_signals``).

    A worker starts with the arbiter's signal handlers, which only queue a signal for
    the arbiter's loop (the worker's copy of it, which never reads it): a stop signal
    that came before the worker's own handlers would be lost, the worker would serve on,
    and gunicorn would kill it at the graceful timeout. Blocked, the signal waits and is
    delivered to the worker's handler. ``os.register_at_fork`` is the standard library's
    hook around every ``os.fork``; it acts only in this (the arbiter's) process.
    """
    arbiter = os.getpid()
    masks: list[set[int | signal.Signals]] = []

    def before() -> None:
        if os.getpid() == arbiter:
            masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS))

    def after_in_parent() -> None:
        if os.getpid() == arbiter and masks:
            signal.pthread_sigmask(signal.SIG_SETMASK, masks.pop())

    def after_in_child() -> None:
        masks.clear()  # the child keeps the signals blocked; its handlers unblock them

    os.register_at_fork(
        before=before, after_in_parent=after_in_parent, after_in_child=after_in_child
    )
