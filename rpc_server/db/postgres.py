"""PostgreSQL: asyncpg's own pool (``asyncpg.create_pool``), through its public API.

asyncpg prepares each statement once per connection (its statement cache) and hands back
Python values, so rows need no processing. The pool opens connections when they are
needed (``min_size=0``: the server starts while PostgreSQL is down, and /readyz says so)
up to ``size + overflow``; a connection idle for ``IDLE_LIFETIME`` seconds is closed.

Giving a connection back costs no round trip: a unit of work rolls back what it did not
commit itself, and it uses no session state (LISTEN, advisory locks, SET) that
asyncpg's default reset (``Connection.reset``: a query on every release) would clear,
so the pool's ``reset`` does nothing more.

A pooled connection the server has closed (a restart, ``pg_terminate_backend``, an idle
timeout) is reopened by the pool when asyncpg has noticed; when it has not yet, the
first statement fails, the connection is dropped and the statement runs on another
(``rpc_server.db.connection``). ``RPC_SERVER_DB_PRE_PING`` adds a ``SELECT 1`` at
checkout for networks where connections die silently.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL

from rpc_server.db.compile import StatementCache
from rpc_server.db.errors import UNAVAILABLE_SQLSTATE_PREFIXES, pool_timeout, sqlalchemy_error

# SQLSTATEs after which a connection is gone: connection exceptions, and the server
# shutting down, crashing or starting (57P01 to 57P03).
GONE_SQLSTATE_PREFIXES = ("08", "57P01", "57P02", "57P03")
IDLE_LIFETIME = 300.0
CLOSE_WAIT = 10.0
# Errors that leave an asyncpg connection unusable. A connection is never shared, so
# asyncpg complaining about the state of its protocol ("another operation is in
# progress", "cannot switch to state …") means it is broken: typically the server's
# termination notice arrived and the socket's end has not been read yet.
_BROKEN = (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def postgres_dialect() -> PGDialect_asyncpg:
    """The dialect statements are compiled for (and that reads the URL's options)."""
    return PGDialect_asyncpg(dbapi=PGDialect_asyncpg.import_dbapi())  # type: ignore[no-untyped-call]


async def _keep(_connection: Any) -> None:
    """The pool's ``reset``: nothing to undo (see the module docstring)."""


class PostgresEngine:
    """The PostgreSQL side of ``rpc_server.db.connection.Engine``."""

    dialect_name = "postgresql"
    begin_sql = "BEGIN"
    # asyncpg runs one query at a time per connection: every unit of work has its own.
    shares_readers = False

    def __init__(
        self,
        url: URL,
        *,
        size: int,
        overflow: int,
        timeout: float,
        connect_timeout: float,
        pre_ping: bool = False,
    ):
        dialect = postgres_dialect()
        self.statements = StatementCache(dialect, process_results=False)
        # The connect arguments SQLAlchemy would use for this URL (host, port, user, …).
        args, kwargs = dialect.create_connect_args(url)  # type: ignore[no-untyped-call]
        self._connect_args = (args, {**kwargs, "timeout": connect_timeout})
        self._max_size, self._timeout = size + overflow, timeout
        self._pre_ping = pre_ping
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None

    async def _opened_pool(self) -> Any:
        # Created on first use, inside the running loop; asyncpg opens no connection yet.
        if self._pool is None:
            self._opening = self._opening or asyncio.Lock()
            async with self._opening:
                if self._pool is None:
                    args, kwargs = self._connect_args
                    self._pool = await asyncpg.create_pool(
                        *args,
                        **kwargs,
                        min_size=0,
                        max_size=self._max_size,
                        max_inactive_connection_lifetime=IDLE_LIFETIME,
                        reset=_keep,
                    )
        return self._pool

    async def connect(self, **options: Any) -> Any:
        """A connection of its own, outside the pool, with this engine's connect
        arguments and ``options`` (asyncpg.connect's): the live feed's LISTEN connection.
        The caller closes it."""
        args, kwargs = self._connect_args
        return await asyncpg.connect(*args, **{**kwargs, **options})

    async def acquire(self, *, write: bool = True) -> Any:
        pool = await self._opened_pool()
        try:
            connection = await pool.acquire(timeout=self._timeout)
        except TimeoutError:
            raise pool_timeout(self._max_size, self._timeout) from None
        if self._pre_ping:
            try:
                await connection.execute("SELECT 1")
            except Exception:
                self.discard(connection)  # frees its place: the pool opens a new one
                connection = await pool.acquire(timeout=self._timeout)
        return connection

    async def release(self, connection: Any) -> None:
        await self._pool.release(connection)  # shielded by asyncpg against cancellation

    def discard(self, connection: Any) -> None:
        # asyncpg frees its place in the pool. A connection the server closed has been
        # taken back by the pool already (its proxy detached): nothing left to do.
        with contextlib.suppress(asyncpg.InterfaceError):
            connection.terminate()

    async def fetch(self, connection: Any, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        return await connection.fetch(sql, *arguments)  # type: ignore[no-any-return]

    async def begin_and_fetch(
        self, connection: Any, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        await connection.execute(self.begin_sql)
        return await connection.fetch(sql, *arguments)  # type: ignore[no-any-return]

    async def commit(self, connection: Any) -> None:
        await connection.execute("COMMIT")

    async def rollback(self, connection: Any) -> None:
        try:
            in_transaction = connection.is_in_transaction()
        except asyncpg.InterfaceError:
            return  # closed by the server and taken back by the pool: nothing to undo
        if in_transaction:
            await connection.execute("ROLLBACK")

    def is_gone(self, connection: Any, error: BaseException) -> bool:
        if isinstance(error, _BROKEN):
            return True
        try:
            if connection.is_closed():
                return True
        except asyncpg.InterfaceError:
            return True  # closed, and its proxy already detached by the pool
        sqlstate = getattr(error, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate.startswith(GONE_SQLSTATE_PREFIXES)

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        if isinstance(error, asyncpg.InterfaceError):
            return sa_exc.InterfaceError(sql, None, error, connection_invalidated=invalidated)
        if isinstance(error, asyncpg.InternalClientError):
            return sqlalchemy_error(
                error, sql, invalidated, integrity=False, unavailable=invalidated
            )
        if not isinstance(error, (asyncpg.PostgresError, OSError)):
            return None
        sqlstate = getattr(error, "sqlstate", None)
        return sqlalchemy_error(
            error,
            sql,
            invalidated,
            integrity=isinstance(error, asyncpg.IntegrityConstraintViolationError),
            unavailable=isinstance(error, OSError)
            or (isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATE_PREFIXES)),
        )

    async def close(self) -> None:
        """Close every connection; one still checked out after ``CLOSE_WAIT`` seconds
        (a unit of work that outlived the server's drain) is terminated."""
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_WAIT)
        except TimeoutError:
            self._pool.terminate()
