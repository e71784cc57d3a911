"""SQLite: plain aiosqlite connections, a small pool of our own and a shared reader.

SQLite is tuned for a server: WAL (readers never block the writer), a busy timeout,
foreign keys on, ``synchronous=NORMAL``. A unit of work that will write runs in a
``BEGIN IMMEDIATE`` transaction: a deferred transaction that reads and then writes
fails at once with "database is locked" whatever the busy timeout, because SQLite
cannot upgrade its read lock while another writer holds the database. When its first
statement changes rows (``INSERT``, ``UPDATE``, ``DELETE``, ``REPLACE``), the sqlite3
module opens that transaction itself, in the same trip to the connection's thread
(``isolation_level="IMMEDIATE"``: the module's documented implicit ``BEGIN IMMEDIATE``
before such a statement when no transaction is open); when it starts with anything
else (a ``SELECT``, a ``SAVEPOINT``), ``BEGIN IMMEDIATE`` is sent first. No other
statement ever opens a transaction: reads are ``SELECT`` only.

Writers of one process take turns on an ``asyncio.Lock`` before they take a connection,
and hold it until they give the connection back. Without it they would contend for
SQLite's write lock through its busy handler, which sleeps in growing steps (up to
100 ms) and polls: under concurrent fulfilments a write then waited far longer than the
writes ahead of it took (fulfil p99 above a second at 600/s). With it, at most one of
the process's connections asks SQLite for the write lock at a time, and only another
process (a ``send-mail``, a CLI command) ever waits in the busy handler. A writer waits
for its turn as long as SQLite's busy timeout, then fails as SQLite would ("database is
locked"). The turn comes before the connection, so the writers take turns on the
connection given back last (the pool's idle connections are a stack): its page cache is
current, where a connection another one has written since must read again what changed.
Measured on ``purchase.fulfill`` under load (one CPU, 32 clients, the deliverer off),
against writers that each held a pooled connection while they waited for the turn (ten
connections written in rotation): 1,280 -> 1,110 µs of server CPU a fulfil, 750 -> 870
fulfils a second.

Each aiosqlite connection owns a thread, and every call is one trip to it (a thread
switch and an event-loop wake-up); a statement is one trip here (``execute_fetchall``),
and a commit or rollback costs none when SQLite has no transaction open
(``in_transaction``). Only aiosqlite's public API is used.

Units of work that only read share one connection (``readers``): they open no
transaction, each statement is its own snapshot (``rpc_server.db.unit_of_work``), so
nothing one of them does can be seen by, or undo, another's. aiosqlite runs the calls
made on a connection one after another on its thread, in the order they were made, so
concurrent reads queue there rather than for a pooled connection. Measured on
``purchase.get`` under load (one CPU, 32 clients): a pool of 10 read connections 3,900
requests/s; a pool of 32, 4,350; one shared connection, 4,800; two shared, 4,500. The
waits for a pooled connection (a semaphore's futures, a timer armed and cancelled, a
wake-up per connection given back) and ten threads taking turns at the interpreter lock
cost more than the reads themselves; a read's SQLite work is a few microseconds. The
price: a slow read delays the reads queued behind it, as it would in a pool that was
full.

``SqlitePool`` keeps up to ``size`` idle connections for units of work that write and
lets ``size + overflow`` be out at once; a caller beyond that waits up to ``timeout``
seconds (then the pool's ``TimeoutError``, -32000). A connection given back beyond
``size`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import URL

from rpc_server.db.compile import StatementCache
from rpc_server.db.errors import pool_timeout, sqlalchemy_error
from rpc_server.private_files import create_private_file

BUSY_TIMEOUT_MS = 30_000


def pragmas(*, foreign_keys: bool = True) -> list[str]:
    """The settings every SQLite connection gets (the server's, and Alembic's with
    ``foreign_keys=False`` while it migrates: ``rpc_server.db.stock_engine``)."""
    return [
        "PRAGMA journal_mode=WAL",
        f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}",
        "PRAGMA synchronous=NORMAL",
    ]


SETUP = ";".join(pragmas()) + ";"


def sqlite_dialect() -> SQLiteDialect_aiosqlite:
    """The dialect statements are compiled for (and that reads the URL's options)."""
    return SQLiteDialect_aiosqlite(dbapi=SQLiteDialect_aiosqlite.import_dbapi())


def opens_transaction(sql: str) -> bool:
    """Whether the sqlite3 module opens a transaction before ``sql`` (with an
    ``isolation_level`` set, outside a transaction): when its first word, after
    whitespace, is one of the four its implicit ``BEGIN`` is documented for."""
    return sql.lstrip(" \t\r\n")[:7].upper().startswith(_IMPLICIT_BEGIN)


_IMPLICIT_BEGIN = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class SqliteEngine:
    """The SQLite side of ``rpc_server.db.connection.Engine``."""

    dialect_name = "sqlite"
    begin_sql = "BEGIN IMMEDIATE"

    def __init__(
        self,
        url: URL,
        *,
        size: int,
        overflow: int,
        timeout: float,
        private_file: Path | None = None,
        write_wait: float = BUSY_TIMEOUT_MS / 1000,
        readers: int = 1,
    ):
        """``write_wait``: how long a writer waits for its turn before it fails as
        SQLite does when its busy timeout runs out. ``readers``: how many connections
        the units of work that only read share (0: each takes a pooled one)."""
        dialect = sqlite_dialect()
        # The same file name and sqlite3 arguments SQLAlchemy would use for this URL.
        self._args, kwargs = dialect.create_connect_args(url)
        # The sqlite3 module opens the transaction before a first statement that changes
        # rows (``begin_and_fetch``); commits and rollbacks are ours.
        self._kwargs = {**kwargs, "isolation_level": "IMMEDIATE"}
        self._private_file = private_file
        # SQLite hands back decimals and datetimes as floats and text: results processed.
        self.statements = StatementCache(dialect, process_results=True)
        self._size, self._timeout = size, timeout
        self._slots = asyncio.Semaphore(size + overflow)
        self._idle: list[aiosqlite.Connection] = []
        self._open: set[aiosqlite.Connection] = set()  # every connection not yet closed
        self._closed = False
        # The process's turn to write, and the connection that holds it (until given back).
        self._write_turn = asyncio.Lock()
        # The connections read units of work share (see ``acquire``), and how many
        # units of work are reading on each.
        self._readers = readers
        self.shares_readers = readers > 0
        self._sharing: dict[aiosqlite.Connection, int] = {}
        self._opening_reader = asyncio.Lock()
        self._writer: aiosqlite.Connection | None = None
        self._write_wait = write_wait

    async def connect(self) -> aiosqlite.Connection:
        """A new connection, tuned."""
        if self._private_file is not None:
            # A database file the server creates is its user's alone; SQLite gives its
            # -wal and -shm files the same mode. Where the file cannot be made (no such
            # directory), SQLite reports that in its own words.
            with contextlib.suppress(OSError):
                create_private_file(self._private_file)
        connection = aiosqlite.connect(*self._args, **self._kwargs)
        try:
            await connection
            await connection.executescript(SETUP)
        except BaseException:
            # Failed, or cancelled while its thread was connecting: end the thread too
            # (aiosqlite's threads are not daemons: one left running keeps the process
            # from exiting).
            connection.stop()
            raise
        self._open.add(connection)
        return connection

    async def acquire(self, *, write: bool = True) -> aiosqlite.Connection:
        """A connection for a unit of work: a shared one to read (``readers`` of them),
        a pooled one of its own to write, once it is this writer's turn (given back
        with the connection)."""
        if not write:
            if self._readers and not self._closed:
                return await self._shared_reader()
            return await self._pooled()
        await self._wait_for_write_turn()
        try:
            connection = await self._pooled()
        except BaseException:
            self._write_turn.release()
            raise
        self._writer = connection
        return connection

    async def _pooled(self) -> aiosqlite.Connection:
        if not await _taken_within(self._slots, self._timeout):
            raise pool_timeout(self._size, self._timeout)
        try:
            if self._idle:
                return self._idle.pop()
            return await self.connect()
        except BaseException:
            self._slots.release()
            raise

    async def _shared_reader(self) -> aiosqlite.Connection:
        """The shared read connection with the fewest units of work on it, opening
        another while there are fewer than ``readers`` and every one is in use."""
        sharing = self._sharing
        least = min(sharing, key=sharing.__getitem__, default=None)
        if least is None or (sharing[least] and len(sharing) < self._readers):
            async with self._opening_reader:
                if len(sharing) < self._readers:  # not opened while this one waited
                    connection = await self.connect()
                    if self._closed:  # while it connected: it would outlive the engine
                        self._open.discard(connection)
                        await connection.close()
                        return await self._pooled()  # closed when given back
                    sharing[connection] = 0
            least = min(sharing, key=sharing.__getitem__)
        sharing[least] += 1
        return least

    def _unshare(self, connection: aiosqlite.Connection) -> bool:
        """Count a read's shared connection as given back; False if it is not one."""
        if connection not in self._sharing:
            return False
        self._sharing[connection] -= 1
        return True

    async def release(self, connection: aiosqlite.Connection) -> None:
        if self._unshare(connection):
            self._end_write_turn(connection)  # (a read unit of work never takes one)
            return
        try:
            if connection not in self._open:
                return  # stopped by ``close`` meanwhile: closing again would never end
            if self._closed or len(self._idle) >= self._size:
                self._open.discard(connection)
                await connection.close()
            else:
                self._idle.append(connection)
        finally:
            self._slots.release()
            # After it is idle again: the next writer takes this connection.
            self._end_write_turn(connection)

    def discard(self, connection: aiosqlite.Connection) -> None:
        if self._unshare(connection):
            # Other reads may be on it, and a read holds nothing that could be left
            # half-done on it (SQLite's connections do not go away): it stays shared.
            return
        self._end_write_turn(connection)  # its transaction ends with it
        self._open.discard(connection)
        connection.stop()  # closes the sqlite3 connection on its thread, then ends it
        self._slots.release()

    async def fetch(
        self, connection: aiosqlite.Connection, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        # A list of tuples (aiosqlite annotates it as an iterable of rows).
        return cast(Sequence[Any], await connection.execute_fetchall(sql, arguments))

    async def begin_and_fetch(
        self, connection: aiosqlite.Connection, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        if self._writer is not connection:  # taken to read: its turn to write first
            await self._wait_for_write_turn()
            self._writer = connection
        if not opens_transaction(sql):
            await connection.execute_fetchall(self.begin_sql)
        return cast(Sequence[Any], await connection.execute_fetchall(sql, arguments))

    async def commit(self, connection: aiosqlite.Connection) -> None:
        if connection.in_transaction:
            await connection.commit()

    async def rollback(self, connection: aiosqlite.Connection) -> None:
        if connection.in_transaction:
            await connection.rollback()

    async def _wait_for_write_turn(self) -> None:
        if not await _taken_within(self._write_turn, self._write_wait):
            raise sqlite3.OperationalError("database is locked")

    def _end_write_turn(self, connection: aiosqlite.Connection) -> None:
        if self._writer is connection:
            self._writer = None
            self._write_turn.release()

    def is_gone(self, connection: aiosqlite.Connection, error: BaseException) -> bool:
        return False  # a file: nothing goes away between statements

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        if not isinstance(error, sqlite3.Error):
            return None
        return sqlalchemy_error(
            error,
            sql,
            invalidated,
            integrity=isinstance(error, sqlite3.IntegrityError),
            unavailable=isinstance(error, sqlite3.OperationalError),
        )

    async def close(self) -> None:
        """Close the idle connections, and stop any still checked out (a unit of work
        that outlived the server's drain), so that no connection thread outlives it."""
        self._closed = True
        idle, self._idle = self._idle, []
        # Shared read connections stay known (a unit of work on one gives it back later).
        idle += [connection for connection, users in self._sharing.items() if not users]
        for connection in idle:
            self._open.discard(connection)
            await connection.close()
        for connection in list(self._open):
            self._open.discard(connection)
            connection.stop()


async def _taken_within(gate: asyncio.Semaphore | asyncio.Lock, seconds: float) -> bool:
    """Take ``gate``, waiting at most ``seconds``; False when that ran out. A free gate
    is taken at once, without arming a timer only to cancel it."""
    if not gate.locked():
        await gate.acquire()
        return True
    try:
        async with asyncio.timeout(seconds):
            await gate.acquire()
    except TimeoutError:
        return False
    return True
