"""A stock SQLAlchemy ``AsyncEngine``: for Alembic's migrations, and nothing on the
request path.

Migrations run DDL through Alembic, which works on SQLAlchemy's own connections; the
server's units of work, rate limiter, readiness check and CLI commands run on the
drivers' pools instead (``rpc_server.db.engines``). The engine is tuned like those:
on SQLite, WAL, the busy timeout, ``synchronous=NORMAL`` and BEGIN emitted by
SQLAlchemy itself (the sqlite3 module's own transaction handling off), with the
public event API; and a SQLite database file it creates is its user's alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from rpc_server.db.engines import is_sqlite, sqlite_path
from rpc_server.db.sqlite import pragmas
from rpc_server.private_files import create_private_file


def stock_engine(url: str, *, foreign_keys: bool = True, **engine_kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` for ``url``; on SQLite ``foreign_keys=False`` leaves SQLite's
    foreign keys off (for migrations: ``rpc_server.db.migrate``)."""
    if not is_sqlite(url):
        return create_async_engine(url, **engine_kwargs)
    if (path := sqlite_path(url)) is not None:
        with contextlib.suppress(OSError):  # SQLite says why, in its words, at connect
            create_private_file(path)
    engine = create_async_engine(url, **engine_kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # BEGIN comes from the "begin" hook
        cursor = dbapi_connection.cursor()
        for pragma in pragmas(foreign_keys=foreign_keys):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine
