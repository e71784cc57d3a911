"""SQLite writers of one process take turns before they take a connection
(``rpc_server.db.sqlite``): a second writer never asks SQLite for the write lock while
the first holds it (so it never sleeps in SQLite's busy handler), gets its turn as soon
as the first gives its connection back however its transaction ended, then writes on
that same connection (its page cache current), and gives up after the busy timeout as
SQLite would."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from rpc_server.db.sqlite import SqliteEngine

pytestmark = pytest.mark.backends("sqlite")


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[SqliteEngine]:
    engine = SqliteEngine(
        make_url(f"sqlite+aiosqlite:///{tmp_path / 'turns.sqlite3'}"),
        size=4,
        overflow=0,
        timeout=5,
        write_wait=0.3,
    )
    connection = await engine.acquire()
    await engine.fetch(connection, "CREATE TABLE t (x INTEGER NOT NULL)", ())
    await engine.release(connection)
    yield engine
    await engine.close()


async def begin_insert(engine: SqliteEngine, value: Any) -> Any:
    """A writer: a pooled connection, BEGIN IMMEDIATE and an INSERT (its turn taken)."""
    connection = await engine.acquire()
    try:
        await engine.begin_and_fetch(connection, "INSERT INTO t (x) VALUES (?)", (value,))
    except BaseException:
        await engine.rollback(connection)
        await engine.release(connection)
        raise
    return connection


async def values(engine: SqliteEngine) -> list[int]:
    connection = await engine.acquire(write=False)
    try:
        rows = await engine.fetch(connection, "SELECT x FROM t ORDER BY rowid", ())
    finally:
        await engine.release(connection)
    return [row[0] for row in rows]


async def test_a_second_writer_waits_for_its_turn_without_asking_sqlite(
    sqlite_engine: SqliteEngine,
) -> None:
    first = await begin_insert(sqlite_engine, 1)
    second = asyncio.create_task(begin_insert(sqlite_engine, 2))
    await asyncio.sleep(0.1)
    assert not second.done(), "waiting for the first writer's turn to end"
    await sqlite_engine.commit(first)
    assert not second.done(), "the turn ends when the connection is given back"
    await sqlite_engine.release(first)
    connection = await asyncio.wait_for(second, 1.0)
    # It waited for its turn before it took a connection (none was idle while the
    # first held its own: it would have opened another), then took the one given back.
    assert connection is first
    assert connection.in_transaction
    await sqlite_engine.commit(connection)
    await sqlite_engine.release(connection)
    assert await values(sqlite_engine) == [1, 2]


async def test_a_connection_taken_to_read_takes_its_turn_before_it_begins(
    sqlite_engine: SqliteEngine,
) -> None:
    first = await begin_insert(sqlite_engine, 1)
    reader = await sqlite_engine.acquire(write=False)
    begun = asyncio.create_task(
        sqlite_engine.begin_and_fetch(reader, "INSERT INTO t (x) VALUES (2)", ())
    )
    await asyncio.sleep(0.1)
    assert not begun.done() and not reader.in_transaction
    await sqlite_engine.commit(first)
    await sqlite_engine.release(first)
    await asyncio.wait_for(begun, 1.0)
    await sqlite_engine.commit(reader)
    await sqlite_engine.release(reader)
    assert await values(sqlite_engine) == [1, 2]
    # Given back, its turn ended: the next writer goes at once.
    third = await asyncio.wait_for(begin_insert(sqlite_engine, 3), 1.0)
    await sqlite_engine.commit(third)
    await sqlite_engine.release(third)


async def test_a_writer_that_waits_past_the_busy_timeout_fails_as_sqlite_would(
    sqlite_engine: SqliteEngine,
) -> None:
    first = await begin_insert(sqlite_engine, 1)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        await begin_insert(sqlite_engine, 2)
    await sqlite_engine.commit(first)
    await sqlite_engine.release(first)
    # The one that gave up took no turn: the next writer goes at once.
    third = await asyncio.wait_for(begin_insert(sqlite_engine, 3), 1.0)
    await sqlite_engine.commit(third)
    await sqlite_engine.release(third)
    assert await values(sqlite_engine) == [1, 3]


@pytest.mark.parametrize("ending", ["failed statement", "rollback", "discard"])
async def test_the_turn_is_given_back_however_the_transaction_ends(
    sqlite_engine: SqliteEngine, ending: str
) -> None:
    if ending == "failed statement":  # NOT NULL refused after BEGIN (then rolled back)
        with pytest.raises(sqlite3.IntegrityError):
            await begin_insert(sqlite_engine, None)
    else:
        first = await begin_insert(sqlite_engine, 1)
        if ending == "rollback":
            await sqlite_engine.rollback(first)
            await sqlite_engine.release(first)
        else:  # a connection dropped mid-transaction (a cancelled unit of work)
            sqlite_engine.discard(first)
    second = await asyncio.wait_for(begin_insert(sqlite_engine, 2), 1.0)
    await sqlite_engine.commit(second)
    await sqlite_engine.release(second)
    assert await values(sqlite_engine) == [2]
