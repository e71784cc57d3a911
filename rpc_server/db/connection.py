"""A unit of work's connection: taken from the engine's pool at its first statement.

``UnitOfWorkConnection`` runs the statements of one unit of work: each compiled once by
SQLAlchemy (``rpc_server.db.compile``), run by the engine's driver on a connection of the
driver's own pool (``Engine``: ``rpc_server.db.sqlite`` or ``rpc_server.db.postgres``).
A writing unit of work opens its transaction with its first statement; a reading one
runs without a transaction, each statement reading one consistent snapshot. Closing
rolls back whatever was not committed and gives the connection back.

If the first statement finds the connection dead (the server restarted or closed it
since it was pooled), the statement runs again on another connection: nothing had been
done on the dead one, so this is what a pre-ping would have achieved, without a round
trip on every checkout. Every pooled connection may have been closed at once (a
restart, ``pg_terminate_backend``), so up to ``MAX_GONE_CONNECTIONS`` are stepped over.
A connection that dies later fails the call (-32000): by then the unit of work has done
things that are not repeated blindly.

Driver errors are raised as SQLAlchemy's exception classes (``IntegrityError``,
``OperationalError``, ``InterfaceError``, ``DBAPIError``, the pool's ``TimeoutError``),
which the error table in ``rpc_server.jsonrpc.errors`` maps to JSON-RPC codes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from sqlalchemy.sql import ClauseElement

from rpc_server.db.compile import Rows, StatementCache

# How many dead pooled connections a statement steps over before it fails (-32000).
MAX_GONE_CONNECTIONS = 64


class Engine(Protocol):
    """A database driver's pool and its statements, as a unit of work needs them."""

    # "sqlite" or "postgresql": for the few statements that differ (schema_version).
    dialect_name: str
    # The statement that opens a writing unit of work's transaction.
    begin_sql: str
    statements: StatementCache

    # Whether units of work that only read share connections (``acquire(write=False)``);
    # the pool's metrics count only connections a unit of work has to itself.
    shares_readers: bool

    async def acquire(self, *, write: bool = True) -> Any:
        """A connection for a unit of work (to share, if it only reads and
        ``shares_readers``); raises the pool's TimeoutError or a connect error."""

    async def release(self, connection: Any) -> None:
        """Give back a connection with no transaction open."""

    def discard(self, connection: Any) -> None:
        """Close a connection that cannot be trusted and free its place in the pool
        (without awaiting: it must work while a task is being cancelled)."""

    async def fetch(self, connection: Any, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        """Run one statement; return its rows (none for a statement without)."""

    async def begin_and_fetch(
        self, connection: Any, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        """Open a transaction (``begin_sql``), then run the statement."""

    async def commit(self, connection: Any) -> None: ...

    async def rollback(self, connection: Any) -> None:
        """Roll back if a transaction is open; nothing otherwise."""

    def is_gone(self, connection: Any, error: BaseException) -> bool:
        """Whether ``error`` means the connection is no longer usable."""

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        """The SQLAlchemy exception for a driver error; None if it is not one."""

    async def close(self) -> None:
        """Close the pool's connections (those checked out close when given back)."""


class PoolObserver(Protocol):
    """Told of each pooled connection a unit of work takes and gives back (the metrics)."""

    def checked_out(self, waited: float) -> None:
        """A connection was taken after ``waited`` seconds."""

    def given_back(self) -> None:
        """A connection taken was given back (or closed)."""


class UnitOfWorkConnection:
    """One unit of work's statements on one pooled connection (see the module docstring)."""

    __slots__ = ("_connection", "_engine", "_observer", "_savepoints", "_statements", "_write")

    def __init__(self, engine: Engine, *, write: bool, observer: PoolObserver | None = None):
        self._engine = engine
        # A shared read connection is nobody's checkout: the pool's metrics leave it out.
        self._observer = observer if write or not engine.shares_readers else None
        self._statements = engine.statements
        self._write = write
        self._connection: Any = None
        self._savepoints = 0

    @property
    def dialect_name(self) -> str:
        """The engine's SQL dialect (``sqlite`` or ``postgresql``), for the rare statement
        written one way per engine."""
        return self._engine.dialect_name

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
        """A savepoint: rolled back, and nothing else, if the block raises.

        Only in a writing unit of work: a savepoint opens a transaction, and a reading
        one may be on a connection other reads share."""
        if not self._write:
            raise RuntimeError("a savepoint needs a unit of work opened with write=True")
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
        if self._connection is not None:
            try:
                await self._engine.commit(self._connection)
            except Exception as error:
                raise self._failed(error, "COMMIT") from error

    async def close(self) -> None:
        """Roll back what was not committed and give the connection back to the pool."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        if self._observer is not None:
            self._observer.given_back()
        try:
            await self._engine.rollback(connection)
        except BaseException as error:
            # Rolled back or not, nobody can tell (a lost connection, or a cancellation
            # while it waited): it is closed, never pooled half-done.
            self._engine.discard(connection)
            if not isinstance(error, Exception):
                raise
            return
        await self._engine.release(connection)

    async def _run(self, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        if self._connection is None:
            return await self._first(sql, arguments)
        try:
            return await self._engine.fetch(self._connection, sql, arguments)
        except Exception as error:
            raise self._failed(error, sql) from error

    async def _first(self, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        engine = self._engine
        attempts = MAX_GONE_CONNECTIONS + 1
        for attempt in range(attempts):
            connection = await self._checkout()
            try:
                if self._write:
                    return await engine.begin_and_fetch(connection, sql, arguments)
                return await engine.fetch(connection, sql, arguments)
            except Exception as error:
                if attempt == attempts - 1 or not engine.is_gone(connection, error):
                    raise self._failed(error, sql) from error
                self._discard()
        raise AssertionError("unreachable")

    async def _checkout(self) -> Any:
        started = time.perf_counter()
        try:
            self._connection = await self._engine.acquire(write=self._write)
        except Exception as error:
            translated = self._engine.translate(error, "connect", True)
            if translated is None:
                raise
            raise translated from error
        if self._observer is not None:
            self._observer.checked_out(time.perf_counter() - started)
        return self._connection

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            if self._observer is not None:
                self._observer.given_back()
            self._engine.discard(connection)

    def _failed(self, error: Exception, sql: str) -> Exception:
        """The exception to raise for a driver error (the connection dropped if gone)."""
        gone = self._connection is not None and self._engine.is_gone(self._connection, error)
        if gone:
            self._discard()
        return self._engine.translate(error, sql, gone) or error
