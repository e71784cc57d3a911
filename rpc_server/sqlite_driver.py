"""aiosqlite with one trip to the connection's thread per statement.

aiosqlite runs each sqlite3 call on the connection's own thread and wakes the event loop
when it is done. SQLAlchemy's aiosqlite adapter makes four such trips per statement
(make a cursor, execute, fetch all rows, close the cursor) and one more to roll back a
connection that has nothing to roll back when it goes back to the pool. Each trip is a
thread switch and an event-loop wake-up, and on a small server those trips, not SQLite,
are what a call waits for.

``OneHopConnection`` is an ``aiosqlite.Connection`` whose cursors do the whole
statement (cursor, execute, fetch, close) in a single trip and keep the rows, and whose
commit and rollback skip the trip when SQLite has no transaction open. SQLAlchemy gets it
through ``create_async_engine(async_creator=...)`` and its adapter works unchanged: it
only sees a cursor that answers ``fetchall`` and ``close`` without waiting.

It relies on ``aiosqlite.Connection._execute`` (queue a function for the connection's
thread), which aiosqlite itself uses for every operation; the lower bound on aiosqlite
in ``pyproject.toml`` is the version it is tested with.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import URL

from rpc_server.private_files import create_private_file

Rows = list[Any]
T = TypeVar("T")
Outcome = tuple[Any, int, int | None, Rows]


def run_statement(connection: sqlite3.Connection, sql: str, parameters: Any) -> Outcome:
    """On the connection's thread: one statement from start to finish."""
    cursor = connection.cursor()
    try:
        cursor.execute(sql, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description is not None else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def begin_and_run(connection: sqlite3.Connection, begin: str, sql: str, parameters: Any) -> Outcome:
    """On the connection's thread: open a transaction, then run the statement."""
    connection.execute(begin)
    return run_statement(connection, sql, parameters)


def _run_many(connection: sqlite3.Connection, sql: str, parameters: Iterable[Any]) -> Outcome:
    cursor = connection.cursor()
    try:
        cursor.executemany(sql, parameters)
        return cursor.description, cursor.rowcount, cursor.lastrowid, []
    finally:
        cursor.close()


class OneHopCursor:
    """A DB-API-shaped async cursor whose ``execute`` is one trip, rows included."""

    arraysize = 1

    def __init__(self, connection: OneHopConnection):
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: Rows = []

    def __await__(self) -> Generator[Any, None, OneHopCursor]:
        return self
        yield  # a generator: awaiting the cursor gives the cursor, at once

    async def __aenter__(self) -> OneHopCursor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Any = ()) -> OneHopCursor:
        outcome = await self._connection.run(
            run_statement, sql, () if parameters is None else parameters
        )
        self.description, self.rowcount, self.lastrowid, self._rows = outcome
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> OneHopCursor:
        outcome = await self._connection.run(_run_many, sql, list(parameters))
        self.description, self.rowcount, self.lastrowid, self._rows = outcome
        return self

    async def fetchall(self) -> Rows:
        rows, self._rows = self._rows, []
        return rows

    async def fetchmany(self, size: int | None = None) -> Rows:
        size = self.arraysize if size is None else size
        rows, self._rows = self._rows[:size], self._rows[size:]
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def close(self) -> None:
        self._rows = []


class OneHopConnection(aiosqlite.Connection):
    """An aiosqlite connection whose statements, commits and rollbacks cost one trip at most."""

    def run(self, function: Callable[..., Outcome], *args: Any) -> Awaitable[Outcome]:
        """Run ``function(sqlite3_connection, *args)`` on the connection's thread."""
        outcome: Awaitable[Outcome] = self._execute(function, self._conn, *args)  # type: ignore[no-untyped-call]
        return outcome

    def cursor(self) -> OneHopCursor:  # type: ignore[override]
        # No trip: the sqlite3 cursor is made on the thread, inside each execute. Like
        # aiosqlite's, the cursor may be awaited or used with ``async with``.
        return OneHopCursor(self)

    def _in_transaction(self) -> bool:
        # sqlite3_get_autocommit, read from this thread: only ever asked between
        # statements, when the connection's thread is not using the connection.
        return self._connection is not None and self._connection.in_transaction

    async def commit(self) -> None:
        if self._in_transaction():
            await super().commit()

    async def rollback(self) -> None:
        if self._in_transaction():
            await super().rollback()


class Connecting(Generic[T]):
    """An awaitable that starts connecting only when it is awaited.

    What an ``async_creator`` returns. A unit of work takes an idle pooled connection
    without SQLAlchemy's greenlet hand-off (``database.UnitOfWorkConnection``); when that
    connection turns out to need reopening, SQLAlchemy calls the creator, finds it cannot
    wait, and gives up before awaiting (the unit of work then checks out the usual way).
    A coroutine would be left never awaited (a RuntimeWarning); this starts nothing.
    """

    __slots__ = ("_connect",)

    def __init__(self, connect: Callable[[], Awaitable[T]]):
        self._connect = connect

    def __await__(self) -> Generator[Any, None, T]:
        return self._connect().__await__()


def one_hop_connector(
    url: URL, *, private_file: Path | None = None
) -> Callable[[], Connecting[OneHopConnection]]:
    """An ``async_creator`` for ``create_async_engine``: connects as SQLAlchemy would
    (same file name and sqlite3 arguments from the URL), with ``OneHopConnection``.

    ``private_file``: the database file, created empty with mode 0600 (on the
    connection's thread, just before SQLite would create it) if missing.
    """
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(url)
    connect: Callable[[], sqlite3.Connection] = partial(sqlite3.connect, *args, **kwargs)
    if private_file is not None:
        connect = partial(_connect_private, private_file, connect)

    async def create() -> OneHopConnection:
        connection = OneHopConnection(connect, iter_chunk_size=64)
        # As SQLAlchemy does for aiosqlite: the thread must not keep the process alive.
        connection._thread.daemon = True
        await connection  # starts the thread and connects; the result is ``connection``
        return connection

    return lambda: Connecting(create)


def _connect_private(path: Path, connect: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
    # SQLite gives its -wal, -shm and -journal files the database file's mode. Where the
    # file cannot be made (no such directory), SQLite reports that in its own words.
    with contextlib.suppress(OSError):
        create_private_file(path)
    return connect()


__all__: Sequence[str] = [
    "Connecting",
    "OneHopConnection",
    "OneHopCursor",
    "begin_and_run",
    "one_hop_connector",
    "run_statement",
]
