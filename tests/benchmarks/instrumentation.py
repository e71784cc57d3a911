"""Instrumenting a server under test: database round-trip counters and a pyinstrument profile.

Used only by the harness's instrumented runs (never by the measured ones), in the
project's launcher (``project_server``) and in the baselines (``floor``, ``handwritten``,
``same_work``):

- ``--count-to PATH``: count what each call costs in database traffic. On SIGUSR1 the
  counts so far are written to PATH as JSON, then reset. Counted:
  ``driver_round_trips``, the waits on the database: aiosqlite hands every operation to
  its connection's thread and waits for the answer (``Connection._execute``), asyncpg
  writes one message batch per round trip to the server's socket (writes to
  ``--count-port`` are counted); ``connections_opened``; and in the project, the SQL
  statements its units of work give the driver (BEGIN, COMMIT and ROLLBACK included and
  also counted apart) and pool checkouts.
- ``--profile-to PREFIX``: SIGUSR2 starts pyinstrument on the event loop's thread, the next
  SIGUSR2 stops it and writes ``PREFIX.html``, ``PREFIX.txt`` (call tree) and
  ``PREFIX.flat.txt`` (time by package, functions by self time and by inclusive time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

COUNTS: Counter[str] = Counter()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count-to", type=Path, help="write round-trip counts here on SIGUSR1")
    parser.add_argument(
        "--count-port", type=int, default=5432, help="the database port whose writes count"
    )
    parser.add_argument("--profile-to", help="profile between two SIGUSR2; write PREFIX.*")
    parser.add_argument("--profile-interval", type=float, default=0.0005)


def attach(app: web.Application, args: argparse.Namespace) -> None:
    """Install what ``args`` asks for on ``app`` (nothing without --count-to/--profile-to)."""
    if args.count_to is not None:
        install_counters(args.count_port)
        app.cleanup_ctx.append(_on_signal(signal.SIGUSR1, lambda: _dump_counts(args.count_to)))
    if args.profile_to is not None:
        app.cleanup_ctx.append(
            _on_signal(signal.SIGUSR2, _profile_toggle(args.profile_to, args.profile_interval))
        )


def _on_signal(signum: int, callback: Callable[[], None]) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        asyncio.get_running_loop().add_signal_handler(signum, callback)
        yield

    return ctx


def _dump_counts(path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(dict(COUNTS), sort_keys=True))
    os.replace(temporary, path)
    COUNTS.clear()


def install_counters(db_port: int) -> None:
    _count_aiosqlite()
    _count_socket_writes(db_port)
    _count_asyncpg_connects()
    _count_statements()  # patches the project's drivers; unused in the baselines


def _count_aiosqlite() -> None:
    from aiosqlite import core

    execute: Any = core.Connection._execute
    connect: Any = core.Connection._connect

    async def counted_execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["driver_round_trips"] += 1
        # Which sqlite3 operation went to the thread: execute, fetchall, close, cursor, …
        COUNTS[f"aiosqlite_{getattr(fn, '__name__', 'call')}"] += 1
        return await execute(self, fn, *args, **kwargs)

    async def counted_connect(self: Any) -> Any:
        COUNTS["connections_opened"] += 1
        return await connect(self)

    core.Connection._execute = counted_execute  # type: ignore[method-assign, assignment]
    core.Connection._connect = counted_connect  # type: ignore[method-assign, assignment]


def _count_socket_writes(db_port: int) -> None:
    from asyncio import selector_events

    transport_class: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009

    def is_database(transport: Any) -> bool:
        peer = transport.get_extra_info("peername")
        return isinstance(peer, tuple) and len(peer) >= 2 and peer[1] == db_port

    original = transport_class.write

    def counted(self: Any, data: Any) -> Any:
        if is_database(self):
            COUNTS["driver_round_trips"] += 1
            # The first message of the batch: Q simple query (BEGIN, COMMIT, ROLLBACK, …),
            # B bind + execute of a prepared statement, P parse (preparing one).
            COUNTS[f"postgres_message_{bytes(data[:1]).decode(errors='replace')}"] += 1
        return original(self, data)

    # (writelines, in Python 3.11, joins and calls write.)
    transport_class.write = counted


def _count_asyncpg_connects() -> None:
    import asyncpg
    import asyncpg.connection

    connect = asyncpg.connection.connect

    async def counted_connect(*args: Any, **kwargs: Any) -> Any:
        COUNTS["connections_opened"] += 1
        return await connect(*args, **kwargs)

    # asyncpg.connect for the baselines, asyncpg.connection.connect for pools made after
    # this (create_pool reads it when the pool is made).
    asyncpg.connect = counted_connect
    asyncpg.connection.connect = counted_connect  # type: ignore[assignment]


def _count_statements() -> None:
    """The project's statements, as its units of work give them to the driver."""
    from rpc_server.db.postgres import PostgresEngine
    from rpc_server.db.sqlite import SqliteEngine

    def in_transaction(connection: Any) -> bool:
        flag = getattr(connection, "is_in_transaction", None)  # asyncpg's, else aiosqlite's
        return bool(flag() if flag is not None else connection.in_transaction)

    for engine in (SqliteEngine, PostgresEngine):
        fetch, begin_and_fetch = engine.fetch, engine.begin_and_fetch
        commit, rollback, acquire = engine.commit, engine.rollback, engine.acquire

        async def counted_fetch(self: Any, connection: Any, *args: Any, _f: Any = fetch) -> Any:
            COUNTS["sql_statements"] += 1
            return await _f(self, connection, *args)

        async def counted_begin_and_fetch(
            self: Any, connection: Any, *args: Any, _f: Any = begin_and_fetch
        ) -> Any:
            COUNTS["sql_statements"] += 2
            COUNTS["sql_begin"] += 1
            return await _f(self, connection, *args)

        async def counted_commit(self: Any, connection: Any, _f: Any = commit) -> Any:
            COUNTS["sql_statements"] += 1
            COUNTS["sql_commit"] += 1
            return await _f(self, connection)

        async def counted_rollback(self: Any, connection: Any, _f: Any = rollback) -> Any:
            if in_transaction(connection):  # otherwise nothing is sent
                COUNTS["sql_statements"] += 1
                COUNTS["sql_rollback"] += 1
            return await _f(self, connection)

        async def counted_acquire(self: Any, *, write: bool = True, _f: Any = acquire) -> Any:
            # A unit of work taking a connection (on SQLite, a read's is shared).
            COUNTS["pool_checkouts"] += 1
            return await _f(self, write=write)

        engine.fetch = counted_fetch  # type: ignore[method-assign]
        engine.begin_and_fetch = counted_begin_and_fetch  # type: ignore[method-assign]
        engine.commit = counted_commit  # type: ignore[method-assign]
        engine.rollback = counted_rollback  # type: ignore[method-assign]
        engine.acquire = counted_acquire  # type: ignore[method-assign]


def count(name: str, increment: int = 1) -> None:
    """For the baselines, which count their own statements."""
    COUNTS[name] += increment


def _profile_toggle(prefix: str, interval: float) -> Callable[[], None]:
    from pyinstrument import Profiler

    state: dict[str, Any] = {"profiler": None}

    def toggle() -> None:
        profiler = state["profiler"]
        if profiler is None:
            # "disabled": sample the event loop thread's stack as it is, whatever task runs.
            profiler = Profiler(interval=interval, async_mode="disabled")
            profiler.start()
            state["profiler"] = profiler
            return
        state["profiler"] = None
        profiler.stop()
        Path(f"{prefix}.html").write_text(profiler.output_html())
        Path(f"{prefix}.flat.txt").write_text(summary(profiler.last_session.root_frame()))
        tree = profiler.output_text(unicode=True, show_all=False)
        temporary = Path(f"{prefix}.txt.tmp")
        temporary.write_text(tree)
        os.replace(temporary, f"{prefix}.txt")  # written last: the harness waits for it

    return toggle


def _package(path: str) -> str:
    """Where a frame's code lives: a site-packages distribution, the project, or stdlib."""
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    for project in ("rpc_server", "schemas", "models", "tests"):
        if project in parts:
            return project
    if "<" in path:
        return path  # <built-in>, <frozen …>, <string>
    return "stdlib:" + parts[-1].removesuffix(".py")


def summary(root: Any, top: int = 40) -> str:
    """A flat view of a pyinstrument call tree: self time by package, by function, and
    inclusive time by function (each function counted once per stack)."""
    by_package: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()

    def walk(frame: Any, stack: frozenset[str]) -> None:
        name = f"{frame.function}  {frame.file_path_short}:{frame.line_no}"
        if frame.is_synthetic:  # "[self]": time spent in the parent itself
            return
        own = frame.time - sum(c.time for c in frame.children if not c.is_synthetic)
        self_time[name] += own
        by_package[_package(frame.file_path or "")] += own
        if name not in stack:
            inclusive[name] += frame.time
        for child in frame.children:
            walk(child, stack | {name})

    walk(root, frozenset())
    total = root.time or 1.0
    lines = [f"total {total:.3f} s of samples on the event loop thread", ""]
    lines.append("self time by package:")
    lines += [f"{t:8.3f} s {100 * t / total:5.1f}%  {n}" for n, t in by_package.most_common()]
    lines += ["", f"top {top} functions by self time:"]
    lines += [f"{t:8.3f} s {100 * t / total:5.1f}%  {n}" for n, t in self_time.most_common(top)]
    lines += ["", f"top {top} functions by inclusive time:"]
    lines += [f"{t:8.3f} s {100 * t / total:5.1f}%  {n}" for n, t in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
