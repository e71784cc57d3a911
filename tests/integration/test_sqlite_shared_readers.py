"""SQLite's reading units of work share a connection (``rpc_server.db.sqlite``).

A read opens no transaction, so reads can queue on one connection's thread instead of
waiting for pooled connections of their own: they never wait for the pool, never time
out on it, and a thread is not started per concurrent read. The pool is the writers'.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from rpc_server.db.engines import open_engine
from rpc_server.db.sqlite import SqliteEngine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from tests.integration.test_sqlite_pool_threads import started_since, threads_back_to

# A statement that keeps SQLite busy for a while (a few hundred ms here).
SLOW_COUNT = text(
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
    "SELECT count(*) FROM n"
)


def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"


async def test_concurrent_reads_share_one_connection_and_never_wait_for_the_pool(
    tmp_path: Path,
) -> None:
    """Twenty reads at once with a pool of one and a pool timeout of 0.3 s: all run at
    the same time on one connection (one thread), none waits for the pool; a write
    meanwhile gets the pooled connection."""
    before = set(threading.enumerate())
    engine = open_engine(url(tmp_path), pool_size=1, max_overflow=0, pool_timeout=0.3)
    uow_factory = SqlUnitOfWorkFactory(engine)
    reading = {"now": 0, "most": 0}

    async def read() -> int:
        async with uow_factory() as uow:
            value = int(await uow.connection.scalar(text("SELECT 1")))
            reading["now"] += 1
            reading["most"] = max(reading["most"], reading["now"])
            await asyncio.sleep(0.5)  # longer than the pool timeout, holding the read
            reading["now"] -= 1
            return value

    async def write(statement: str) -> None:
        async with uow_factory(write=True) as uow:
            await uow.connection.execute(text(statement))
            await uow.commit()

    try:
        # The file made first (as ``rpc-server migrate`` does): in WAL mode from then on.
        await write("CREATE TABLE t (x INTEGER)")
        answers = await asyncio.wait_for(
            asyncio.gather(*(read() for _ in range(20)), write("INSERT INTO t VALUES (1)")), 5
        )
        assert answers[:20] == [1] * 20
        assert reading["most"] == 20
        # One thread for the shared reader, one for the pooled (writing) connection.
        assert len(started_since(before)) == 2
    finally:
        await engine.close()
    await threads_back_to(before)


async def test_a_read_sees_only_what_was_committed_and_its_close_undoes_nothing(
    tmp_path: Path,
) -> None:
    engine = open_engine(url(tmp_path))
    uow_factory = SqlUnitOfWorkFactory(engine)
    count = text("SELECT count(*) FROM t")
    try:
        async with uow_factory(write=True) as uow:
            await uow.connection.execute(text("CREATE TABLE t (x INTEGER)"))
            await uow.commit()
        async with uow_factory(write=True) as writer:
            await writer.connection.execute(text("INSERT INTO t VALUES (1)"))
            async with uow_factory() as reader:  # while the write is not committed
                assert await reader.connection.scalar(count) == 0
            # The read has closed (its "rollback" on the shared connection): the write's
            # transaction is untouched, on its own connection.
            await writer.commit()
        async with uow_factory() as reader:
            assert await reader.connection.scalar(count) == 1
    finally:
        await engine.close()


async def test_a_read_cancelled_midway_leaves_the_shared_connection_serving(
    tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    engine = open_engine(url(tmp_path))
    uow_factory = SqlUnitOfWorkFactory(engine)

    async def slow() -> None:
        async with uow_factory() as uow:
            await uow.connection.scalar(SLOW_COUNT)

    async def quick() -> int:
        async with uow_factory() as uow:
            return int(await uow.connection.scalar(text("SELECT 2")))

    try:
        cancelled = asyncio.create_task(slow())
        others = [asyncio.create_task(quick()) for _ in range(3)]
        await asyncio.sleep(0.05)  # the slow statement is running on the shared thread
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert cancelled.cancelled()
        # The reads queued behind it still answer, and so does the next one.
        assert await asyncio.wait_for(asyncio.gather(*others), 10) == [2, 2, 2]
        assert await asyncio.wait_for(quick(), 10) == 2
        assert len(started_since(before)) == 1
    finally:
        await engine.close()
    await threads_back_to(before)


async def test_closing_ends_the_shared_thread_even_with_a_read_under_way(
    tmp_path: Path,
) -> None:
    """A read still going when the engine closes gives its connection back later
    without error; a read after the close runs, and leaves no thread behind."""
    before = set(threading.enumerate())
    engine = SqliteEngine(make_url(url(tmp_path)), size=2, overflow=0, timeout=5)
    idle = await engine.acquire(write=False)
    await engine.release(idle)
    busy = await engine.acquire(write=False)
    assert busy is idle  # the same shared connection
    await engine.close()
    await threads_back_to(before)
    async with asyncio.timeout(2):
        await engine.release(busy)
    late = await engine.acquire(write=False)
    assert late is not busy
    await engine.release(late)  # closed when given back
    await threads_back_to(before)


async def test_a_second_reader_opens_only_when_the_first_is_in_use(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    engine = SqliteEngine(make_url(url(tmp_path)), size=2, overflow=0, timeout=5, readers=2)
    try:
        first = await engine.acquire(write=False)
        await engine.release(first)
        assert await engine.acquire(write=False) is first  # free: no second connection
        second = await engine.acquire(write=False)  # the first is in use
        assert second is not first
        third = await engine.acquire(write=False)  # both in use: the least busy, shared
        assert third in (first, second)
        assert len(started_since(before)) == 2
        for connection in (first, second, third):
            await engine.release(connection)
    finally:
        await engine.close()
    await threads_back_to(before)
