"""Which engine a database URL needs, with the pool settings from the configuration.

``open_engine`` is the one place that tells SQLite from PostgreSQL; everything above it
(units of work, the rate limiter's buckets, readiness, the CLI) works on the ``Engine``
it returns (``rpc_server.db.connection``). Nothing connects until the first statement.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from rpc_server.config import Settings
from rpc_server.db.connection import Engine, UnitOfWorkConnection
from rpc_server.db.postgres import PostgresEngine
from rpc_server.db.sqlite import SqliteEngine


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


def open_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 0,
    pool_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    pre_ping: bool = False,
    sqlite_readers: int = 1,
) -> Engine:
    """The engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    ``sqlite_readers``: how many connections SQLite's reading units of work share (0:
    each takes a pooled one, as on PostgreSQL). Raises ``ValueError`` for another driver.
    """
    parsed = make_url(url)
    driver = parsed.get_driver_name()
    if parsed.get_backend_name() == "sqlite" and driver == "aiosqlite":
        return SqliteEngine(
            parsed,
            size=pool_size,
            overflow=max_overflow,
            timeout=pool_timeout,
            private_file=sqlite_path(url),
            readers=sqlite_readers,
        )
    if parsed.get_backend_name() == "postgresql" and driver == "asyncpg":
        return PostgresEngine(
            parsed,
            size=pool_size,
            overflow=max_overflow,
            timeout=pool_timeout,
            connect_timeout=connect_timeout,
            pre_ping=pre_ping,
        )
    raise ValueError(
        f"unsupported database URL {parsed.drivername!r}: use sqlite+aiosqlite:// "
        "or postgresql+asyncpg://"
    )


def engine_from_settings(settings: Settings) -> Engine:
    """The server's engine, with the pool settings of ``RPC_SERVER_DB_*``."""
    return open_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        connect_timeout=settings.db_connect_timeout,
        pre_ping=settings.db_pre_ping,
    )


@asynccontextmanager
async def autocommit(engine: Engine) -> AsyncIterator[UnitOfWorkConnection]:
    """Statements without a transaction: each one its own (a read sees one consistent
    snapshot; a single-statement write commits by itself)."""
    connection = UnitOfWorkConnection(engine, write=False)
    try:
        yield connection
    finally:
        await connection.close()
