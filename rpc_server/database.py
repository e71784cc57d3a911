"""Engine creation: one place that knows the differences between SQLite and PostgreSQL.

SQLite is tuned for a server: WAL (readers never block the writer), a busy timeout,
foreign keys on, and SQLAlchemy (not the sqlite3 driver) emitting BEGIN. A unit of work
that will write starts with ``BEGIN IMMEDIATE``: a deferred transaction that reads and
then writes fails at once with "database is locked" whatever the busy timeout, because
SQLite cannot upgrade its read lock while another writer holds the database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from rpc_server.config import Settings

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
    return options


def create_engine(url: str, **engine_kwargs: Any) -> AsyncEngine:
    """Return an async engine for ``url``, tuned for its backend.

    On PostgreSQL every checkout is pinged first (``pool_pre_ping``), so connections
    that died with a database restart are replaced instead of failing a call.
    """
    engine = create_async_engine(url, pool_pre_ping=not is_sqlite(url), **engine_kwargs)
    if is_sqlite(url):
        _tune_sqlite(engine)
    return engine


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
