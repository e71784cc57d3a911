"""PostgreSQL's side of the live feed: one dedicated LISTEN connection per process.

Where it sits: every appended purchase event runs ``pg_notify('purchase_events', seq)``
in its transaction (the trigger of migration 0007), which PostgreSQL delivers at commit,
in commit order, to every listening connection of every host. This module keeps one
such connection per server process and wakes the ``feed`` with each sequence number;
the feed reads the events themselves.

A lost connection (the server restarted, ``pg_terminate_backend``, a network cut found
by the periodic check) is opened again with a growing pause; once it listens again the
feed is woken to read everything after the last event it saw, so nothing committed
while nobody listened is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("rpc_server.live")

CHANNEL = "purchase_events"
APPLICATION_NAME = "rpc-server live feed"
# How often an idle LISTEN connection is checked (a cut without a FIN or RST is found
# only by sending something).
CHECK_SECONDS = 10.0
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0


class PostgresListener:
    """Keeps a LISTEN connection open and calls ``wake(seq)`` for each notification
    (``wake(None)`` once listening again after a reconnection)."""

    def __init__(
        self,
        connect: Callable[..., Awaitable[Any]],
        wake: Callable[[int | None], None],
        *,
        check_seconds: float = CHECK_SECONDS,
    ):
        self._connect = connect
        self._wake = wake
        self._check_seconds = check_seconds
        # How many times the connection has started listening (tests wait on it).
        self.listens = 0
        self.listening = asyncio.Event()

    async def run(self) -> None:
        pause = RECONNECT_FIRST_SECONDS
        while True:
            try:
                await self._listen_once()
                pause = RECONNECT_FIRST_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("live feed: LISTEN connection failed: %s", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX_SECONDS)

    async def _listen_once(self) -> None:
        connection = await self._connect(server_settings={"application_name": APPLICATION_NAME})
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._notified)
            self.listens += 1
            self.listening.set()
            if self.listens > 1:
                log.info("live feed: listening again; catching up")
            self._wake(None)  # whatever was committed while nobody listened
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._check_seconds):
                        await lost.wait()
                if not lost.is_set():
                    async with asyncio.timeout(self._check_seconds):
                        await connection.fetchval("SELECT 1")
            log.warning("live feed: LISTEN connection lost; reconnecting")
        finally:
            connection.terminate()

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            seq: int | None = int(payload)
        except ValueError:
            seq = None  # not ours: read whatever is new
        self._wake(seq)
