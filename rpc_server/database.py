"""Engine creation: one place that knows the differences between SQLite and PostgreSQL.

SQLite is tuned for a server: WAL (readers never block the writer), a busy timeout,
foreign keys on, and SQLAlchemy (not the sqlite3 driver) emitting BEGIN. A unit of work
that will write starts with ``BEGIN IMMEDIATE``: a deferred transaction that reads and
then writes fails at once with "database is locked" whatever the busy timeout, because
SQLite cannot upgrade its read lock while another writer holds the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, CursorResult, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import Executable

from rpc_server.config import Settings
from rpc_server.sqlite_driver import one_hop_connector

# Execution option a write unit of work sets; the "begin" hook turns it into IMMEDIATE.
SQLITE_IMMEDIATE = "rpc_server_sqlite_immediate"
# Execution option of read units of work: no BEGIN at all. Each of them runs a single
# SELECT, which SQLite (in WAL mode) answers from one consistent snapshot by itself;
# skipping BEGIN saves a round trip to aiosqlite's thread per read.
SQLITE_READ_ONLY = "rpc_server_sqlite_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def engine_options(settings: Settings) -> dict[str, Any]:
    """Pool settings from the configuration, for ``create_engine``."""
    options: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
    }
    if not is_sqlite(settings.database_url):
        # asyncpg's own connect timeout: an unreachable server fails fast (-32000).
        options["connect_args"] = {"timeout": settings.db_connect_timeout}
        options["pool_pre_ping"] = settings.db_pre_ping
    return options


def create_engine(url: str, **engine_kwargs: Any) -> AsyncEngine:
    """Return an async engine for ``url``, tuned for its backend.

    On PostgreSQL a pooled connection that the server has closed (a restart,
    ``pg_terminate_backend``, an idle timeout) is replaced at checkout instead of failing
    a call. asyncpg notices the closed socket by itself, so the check costs nothing;
    ``pool_pre_ping=True`` (``RPC_SERVER_DB_PRE_PING``) adds a round trip per checkout
    for networks where connections die silently.
    """
    if is_sqlite(url):
        # One trip to aiosqlite's thread per statement instead of four (sqlite_driver).
        engine_kwargs.setdefault("async_creator", one_hop_connector(make_url(url)))
        engine = create_async_engine(url, **engine_kwargs)
        _tune_sqlite(engine)
        return engine
    engine = create_async_engine(url, **engine_kwargs)
    _replace_closed_connections(engine)
    _mark_lost_connections(engine)
    return engine


def _replace_closed_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        driver_connection = record.driver_connection
        if driver_connection is not None and driver_connection.is_closed():
            # The pool retries the checkout with a new connection.
            raise DisconnectionError("the server closed this connection")


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy emit BEGIN itself (see the "begin" hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get(SQLITE_READ_ONLY, False):
            return
        immediate = options.get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# SQLSTATEs after which a connection is gone: connection exceptions, and the server
# shutting down, crashing or starting (57P01 to 57P03). asyncpg may report them before it
# has noticed the closed socket, so SQLAlchemy is told explicitly.
_GONE_SQLSTATE_PREFIXES = ("08", "57P01", "57P02", "57P03")


def _mark_lost_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        error = context.original_exception
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_GONE_SQLSTATE_PREFIXES):
            context.is_disconnect = True  # invalidates it (and older pooled connections)


Result = CursorResult[*tuple[Any, ...]]


class UnitOfWorkConnection:
    """A unit of work's connection, checked out when its first statement runs.

    If that first statement finds the connection dead (the server restarted or closed
    it since it was pooled), the statement runs again once on a new connection: nothing
    had been done on the dead one, so this is what a pre-ping would have achieved,
    without a round trip on every checkout. A connection that dies later fails the call
    (-32000): by then the unit of work has done things that are not repeated blindly.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._connection: AsyncConnection | None = None

    async def execute(self, statement: Executable, params: Any = None) -> Result:
        if self._connection is not None:
            return await self._connection.execute(statement, params)
        self._connection = await self._engine.connect()
        try:
            return await self._connection.execute(statement, params)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        await self.close()
        self._connection = await self._engine.connect()
        return await self._connection.execute(statement, params)

    async def scalar(self, statement: Executable, params: Any = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        """A savepoint: rolled back, and nothing else, if the block raises."""
        if self._connection is None:
            self._connection = await self._engine.connect()
        async with self._connection.begin_nested():
            yield

    async def commit(self) -> None:
        if self._connection is not None:
            await self._connection.commit()

    async def close(self) -> None:
        """Roll back what was not committed and give the connection back to the pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
