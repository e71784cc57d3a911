"""Units of work's way in and out of SQLAlchemy's connection pool, without greenlets.

SQLAlchemy's asyncio engine runs its (synchronous) pool code inside a greenlet, so that
the pool can await when it must: to connect, to pre-ping, or to wait for a connection to
come back. Each hand-off costs about as much as the pool's own work, and a unit of work
pays one to take a connection and one to give it back. Most of the time neither needs
I/O, so ``PoolGate`` calls the pool directly when it does not:

- taking: when a connection is idle in the pool (and the pool does not pre-ping);
- waiting: when every connection is out, on a future that the pool's ``checkin`` event
  resolves, then taking the returned one directly;
- giving back: when the pool does not reset connections on return (units of work roll
  back themselves) and has room for it (it would otherwise close it).

Everything else (connecting, reopening a connection the server closed, overflow
connections, pre-ping) goes through SQLAlchemy's usual path, greenlet and all. If an
idle connection turns out to need reopening, the pool raises ``MissingGreenlet`` before
doing any I/O and takes it back, and the usual path reopens it (``async_creator``s start
connecting only when awaited: ``sqlite_driver.Connecting``).

It reads four private settings of the pool (``_pre_ping``, ``_reset_on_return``,
``_max_overflow``, ``_timeout``), which SQLAlchemy has kept under these names since 1.4.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.pool.base import reset_none
from sqlalchemy.util.concurrency import greenlet_spawn


class PoolGate:
    """Takes connections from an engine's pool and gives them back, directly when it can."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._waiters: deque[asyncio.Future[None]] = deque()
        event.listen(engine.sync_engine, "checkin", self._on_checkin)

    def _queue_pool(self) -> QueuePool | None:
        pool = self._engine.sync_engine.pool
        return pool if isinstance(pool, QueuePool) and not pool._pre_ping else None

    async def checkout(self) -> PoolProxiedConnection:
        """A pooled connection (raises what the pool raises: its timeout, connect errors)."""
        pool = self._queue_pool()
        if pool is not None:
            pooled = self._take_idle(pool)
            if pooled is None and pool.overflow() >= pool._max_overflow:
                pooled = await self._wait_for_one(pool)
            if pooled is not None:
                return pooled
        return await self._engine.raw_connection()

    async def give_back(self, pooled: PoolProxiedConnection) -> None:
        """Return ``pooled`` to the pool."""
        pool = self._queue_pool()
        if (
            pool is not None
            and pool._reset_on_return is reset_none
            and pool.overflow() <= 0  # no more connections than the pool holds: room
            and pooled.is_valid
        ):
            pooled.close()
        else:
            await greenlet_spawn(pooled.close)

    def _take_idle(self, pool: QueuePool) -> PoolProxiedConnection | None:
        if pool.checkedin() == 0:
            return None
        try:
            return self._engine.sync_engine.raw_connection()
        except MissingGreenlet:
            return None  # it had to be reopened: the pool took it back

    async def _wait_for_one(self, pool: QueuePool) -> PoolProxiedConnection | None:
        """Wait for a connection to come back and take it; None when one can be opened
        instead (or must be reopened), for the usual path. Raises the pool's timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pool._timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as error:
                if waiter.done() and not waiter.cancelled():
                    self._on_checkin()  # woken, but leaving: the next one is woken instead
                else:
                    waiter.cancel()
                if isinstance(error, TimeoutError):
                    raise PoolTimeoutError(
                        f"QueuePool limit of size {pool.size()} overflow "
                        f"{pool._max_overflow} reached, connection timed out, "
                        f"timeout {pool._timeout:.2f}"
                    ) from None
                raise
            pooled = self._take_idle(pool)
            if pooled is not None:
                return pooled
            if pool.overflow() < pool._max_overflow or pool.checkedin() > 0:
                return None  # room to open one, or one to reopen: the usual path

    def _on_checkin(self, *_: Any) -> None:
        """A connection came back: wake the longest waiting unit of work."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
