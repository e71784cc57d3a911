"""Engine creation: one place that knows the differences between SQLite and PostgreSQL.

SQLite is tuned for a server: WAL (readers never block the writer), a busy timeout,
foreign keys on, and the sqlite3 module leaving BEGIN to us. A unit of work that will
write starts with ``BEGIN IMMEDIATE``: a deferred transaction that reads and then writes
fails at once with "database is locked" whatever the busy timeout, because SQLite
cannot upgrade its read lock while another writer holds the database. (Code that uses
SQLAlchemy's own connections gets the same with the ``SQLITE_IMMEDIATE`` option.)

Units of work run on ``UnitOfWorkConnection``: a pooled connection whose statements,
compiled by SQLAlchemy, run on the driver's connection (``drivers``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql import ClauseElement

from rpc_server.config import Settings
from rpc_server.connection_pool import PoolGate
from rpc_server.drivers import (
    GONE_SQLSTATE_PREFIXES,
    AsyncpgDriver,
    Driver,
    Rows,
    SqliteDriver,
    StatementCache,
)
from rpc_server.sqlite_driver import Connecting, one_hop_connector

# Execution option a write unit of work sets; the "begin" hook turns it into IMMEDIATE.
SQLITE_IMMEDIATE = "rpc_server_sqlite_immediate"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names (opening it creates it if missing); None for another
    engine, an in-memory database or a ``file:`` URI."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if "uri" in parsed.query or database.startswith("file:"):
        return None
    return Path(database)


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


def asyncpg_connector(url: URL, connect_args: Mapping[str, Any]) -> Callable[[], Connecting[Any]]:
    """An ``async_creator``: ``asyncpg.connect`` with the arguments SQLAlchemy would use
    (from the URL, plus ``connect_args``), started only when awaited (``Connecting``)."""
    args, kwargs = PGDialect_asyncpg().create_connect_args(url)  # type: ignore[no-untyped-call]
    connect = partial(asyncpg.connect, *args, **{**kwargs, **connect_args})
    return lambda: Connecting(connect)


def create_engine(url: str, **engine_kwargs: Any) -> AsyncEngine:
    """Return an async engine for ``url``, tuned for its backend.

    On PostgreSQL a pooled connection that the server has closed (a restart,
    ``pg_terminate_backend``, an idle timeout) is replaced at checkout instead of failing
    a call. asyncpg notices the closed socket by itself, so the check costs nothing;
    ``pool_pre_ping=True`` (``RPC_SERVER_DB_PRE_PING``) adds a round trip per checkout
    for networks where connections die silently.

    Connections go back to the pool without the pool's own rollback: units of work roll
    back what they did not commit themselves, as SQLAlchemy's ``Connection`` does when
    it closes, so the pool's reset would only repeat it, and without it giving a
    connection back needs no I/O (``UnitOfWorkConnection``).
    """
    engine_kwargs.setdefault("pool_reset_on_return", None)
    if is_sqlite(url):
        # One trip to aiosqlite's thread per statement instead of four (sqlite_driver).
        # A database file the server creates is its user's alone (rpc_server.private_files).
        connector = one_hop_connector(make_url(url), private_file=sqlite_path(url))
        engine_kwargs.setdefault("async_creator", connector)
        engine = create_async_engine(url, **engine_kwargs)
        _tune_sqlite(engine)
        return engine
    connect_args = engine_kwargs.pop("connect_args", {})
    engine_kwargs.setdefault("async_creator", asyncpg_connector(make_url(url), connect_args))
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
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# After these SQLSTATEs a connection is gone; asyncpg may report them before it has
# noticed the closed socket, so SQLAlchemy is told explicitly.


def _mark_lost_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        error = context.original_exception
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(GONE_SQLSTATE_PREFIXES):
            context.is_disconnect = True  # invalidates it (and older pooled connections)


Parameters = Mapping[str, Any] | None


# How many dead pooled connections a statement steps over before it fails (-32000).
MAX_GONE_CONNECTIONS = 64


class UnitOfWorkConnection:
    """A unit of work's connection: taken from the pool at its first statement.

    Statements are compiled by SQLAlchemy and run on the driver's connection
    (``drivers``). A writing unit of work opens its transaction with its first statement
    (on SQLite in the same trip to aiosqlite's thread); a reading one runs without a
    transaction, each statement reading one consistent snapshot. Closing rolls back
    whatever was not committed and gives the connection back.

    If the first statement finds the connection dead (the server restarted or closed it
    since it was pooled), the statement runs again once on a new connection: nothing had
    been done on the dead one, so this is what a pre-ping would have achieved, without a
    round trip on every checkout. A connection that dies later fails the call (-32000):
    by then the unit of work has done things that are not repeated blindly.
    """

    __slots__ = (
        "_driver",
        "_driver_connection",
        "_pool",
        "_pooled",
        "_savepoints",
        "_statements",
        "_write",
    )

    def __init__(self, pool: PoolGate, driver: Driver, statements: StatementCache, *, write: bool):
        self._pool = pool
        self._driver = driver
        self._statements = statements
        self._write = write
        self._pooled: PoolProxiedConnection | None = None
        self._driver_connection: Any = None
        self._savepoints = 0

    async def execute(
        self, statement: ClauseElement, params: Mapping[str, Any] | None = None
    ) -> Rows:
        """Run one statement with ``params`` (by name); return its rows."""
        compiled = self._statements.get(statement, params)
        return compiled.rows(await self._run(compiled.sql, compiled.parameters(params)))

    async def scalar(
        self, statement: ClauseElement, params: Mapping[str, Any] | None = None
    ) -> Any:
        return (await self.execute(statement, params)).scalar()

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        """A savepoint: rolled back, and nothing else, if the block raises."""
        self._savepoints += 1
        name = f"unit_of_work_{self._savepoints}"
        await self._run(f"SAVEPOINT {name}", ())
        try:
            yield
        except BaseException:
            await self._run(f"ROLLBACK TO SAVEPOINT {name}", ())
            raise
        await self._run(f"RELEASE SAVEPOINT {name}", ())

    async def commit(self) -> None:
        if self._driver_connection is not None:
            try:
                await self._driver.commit(self._driver_connection)
            except Exception as error:
                raise self._failed(error, "COMMIT") from error

    async def close(self) -> None:
        """Roll back what was not committed and give the connection back to the pool."""
        pooled, connection = self._pooled, self._driver_connection
        if pooled is None:
            return
        self._pooled = self._driver_connection = None
        try:
            await self._driver.rollback(connection)
        except BaseException as error:
            # Rolled back or not, nobody can tell (a lost connection, or a cancellation
            # while it waited): it is closed, never pooled half-done. Without awaiting, so
            # that a cancellation cannot leave it checked out.
            pooled.invalidate(error)
            pooled.close()
            if not isinstance(error, Exception):
                raise
            return
        await self._pool.give_back(pooled)

    async def _run(self, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        if self._driver_connection is None:
            return await self._first(sql, arguments)
        try:
            return await self._driver.fetch(self._driver_connection, sql, arguments)
        except Exception as error:
            raise self._failed(error, sql) from error

    async def _first(self, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        driver = self._driver
        # Every pooled connection may have been closed by the server at once (a restart,
        # pg_terminate_backend): each one found gone is discarded and the statement runs
        # on the next, so a pool of dead connections is worked through, not just one.
        attempts = MAX_GONE_CONNECTIONS + 1
        for attempt in range(attempts):
            retry = attempt == attempts - 1
            connection = await self._checkout()
            try:
                if self._write:
                    return await driver.begin_and_fetch(
                        connection, driver.begin_sql, sql, arguments
                    )
                return await driver.fetch(connection, sql, arguments)
            except Exception as error:
                if retry or not driver.is_gone(connection, error):
                    raise self._failed(error, sql) from error
                self._discard(error)
        raise AssertionError("unreachable")

    async def _checkout(self) -> Any:
        try:
            self._pooled = await self._pool.checkout()
        except Exception as error:
            translated = self._driver.translate(error, "connect", True)
            if translated is None:
                raise
            raise translated from error
        self._driver_connection = self._pooled.driver_connection
        return self._driver_connection

    def _discard(self, error: BaseException) -> None:
        """Drop the connection: it is closed, not pooled again."""
        pooled = self._pooled
        self._pooled = self._driver_connection = None
        if pooled is not None:
            pooled.invalidate(error)  # outside a greenlet SQLAlchemy closes it at once
            pooled.close()

    def _failed(self, error: Exception, sql: str) -> Exception:
        """The exception to raise for a driver error (the connection dropped if gone)."""
        gone = self._driver_connection is not None and self._driver.is_gone(
            self._driver_connection, error
        )
        if gone:
            self._discard(error)
        return self._driver.translate(error, sql, gone) or error


def driver_for(engine: AsyncEngine) -> Driver:
    """The driver adapter for the engine's database driver."""
    name = engine.dialect.driver
    if name == "aiosqlite":
        return SqliteDriver()
    if name == "asyncpg":
        return AsyncpgDriver()
    raise ValueError(f"unsupported database driver {name!r}: use aiosqlite or asyncpg")
