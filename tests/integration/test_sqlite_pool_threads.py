"""SQLite's pool never leaves a connection thread behind.

aiosqlite runs each connection on a thread of its own, and those threads are not
daemons: one left running keeps the process from exiting (``rpc-server serve`` would
hang after its drain). The pool ends every thread it started, whatever happened to the
connection: given back beyond the pool's size, still checked out when the pool closes,
or cancelled while it was connecting.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from rpc_server.db.sqlite import SqliteEngine


def pool(path: Path, *, size: int, overflow: int = 0, timeout: float = 5.0) -> SqliteEngine:
    """A pool for reads (``readers=0``): writers take turns, one connection at a time."""
    return SqliteEngine(
        make_url(f"sqlite+aiosqlite:///{path}"),
        size=size,
        overflow=overflow,
        timeout=timeout,
        readers=0,
    )


def started_since(before: set[threading.Thread]) -> set[threading.Thread]:
    """The threads running now that were not running at ``before`` (other tests' threads
    may end meanwhile: only the new ones are counted)."""
    return set(threading.enumerate()) - before


async def threads_back_to(before: set[threading.Thread], extra: int = 0) -> None:
    for _ in range(500):  # threads end on their own: polled, for up to 5 s
        if len(started_since(before)) <= extra:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"threads still running: {started_since(before)}")


async def test_connections_beyond_the_pool_size_are_closed_when_given_back(
    tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    engine = pool(tmp_path / "db.sqlite3", size=1, overflow=2)
    connections = [await engine.acquire(write=False) for _ in range(3)]
    assert len(started_since(before)) == 3
    for connection in connections:
        await engine.release(connection)
    await threads_back_to(before, extra=1)  # one kept idle for the next unit of work
    assert len(started_since(before)) == 1
    await engine.close()
    await threads_back_to(before)


async def test_closing_stops_connections_still_checked_out(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    engine = pool(tmp_path / "db.sqlite3", size=2)
    idle, busy = await engine.acquire(write=False), await engine.acquire(write=False)
    await engine.release(idle)
    await engine.close()
    await threads_back_to(before)
    # The unit of work that held it gives it back later: that ends at once.
    async with asyncio.timeout(2):
        await engine.release(busy)


async def test_a_connect_cancelled_midway_leaves_no_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    engine = pool(tmp_path / "db.sqlite3", size=1)
    acquiring = asyncio.ensure_future(engine.acquire())
    await asyncio.sleep(0)  # the connection's thread has started connecting
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    await threads_back_to(before)
    # Its place in the pool was given back: the next unit of work gets a connection.
    connection = await asyncio.wait_for(engine.acquire(), 2)
    await engine.release(connection)
    await engine.close()
    await threads_back_to(before)


async def test_beyond_size_and_overflow_a_caller_waits_then_times_out(tmp_path: Path) -> None:
    engine = pool(tmp_path / "db.sqlite3", size=1, timeout=0.2)
    held = await engine.acquire(write=False)
    with pytest.raises(sa_exc.TimeoutError, match="RPC_SERVER_DB_POOL_SIZE"):
        await engine.acquire(write=False)
    await engine.release(held)
    again = await asyncio.wait_for(engine.acquire(), 2)  # the same, pooled
    assert again is held
    await engine.release(again)
    await engine.close()
