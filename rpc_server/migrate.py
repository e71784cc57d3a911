"""Schema migrations with Alembic, run programmatically on our own async engine."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from rpc_server.database import create_engine

MIGRATIONS = "rpc_server:migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def without_sqlite_foreign_keys(engine: AsyncEngine) -> None:
    """Turn SQLite's foreign keys off on the engine's connections, for migrating.

    SQLite alters a table by copying it to a new one, dropping the old one and renaming
    the copy (Alembic's batch mode); with foreign keys on, dropping a table that other
    rows refer to fails, and the pragma cannot change inside the migration's transaction.
    ``check_sqlite_foreign_keys`` then checks every reference before the commit.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _off(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")
        cursor.close()


def check_sqlite_foreign_keys(connection: Connection) -> None:
    """Raise if any row refers to a row that does not exist (SQLite's own check)."""
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if violations:
        raise RuntimeError(f"foreign key violations after migrating: {violations[:10]}")


async def migrate(database_url: str, revision: str = "head") -> None:
    """Create or upgrade the schema of ``database_url`` to ``revision``."""
    engine = create_engine(database_url, poolclass=NullPool)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        without_sqlite_foreign_keys(engine)

    def upgrade(sync: Connection) -> None:
        command.upgrade(alembic_config(sync), revision)
        if sqlite:
            check_sqlite_foreign_keys(sync)

    try:
        async with engine.connect() as connection:
            await connection.run_sync(upgrade)
            await connection.commit()
    finally:
        await engine.dispose()
