"""Schema migrations with Alembic, run programmatically on a stock SQLAlchemy engine
(``rpc_server.db.stock_engine``: Alembic works on SQLAlchemy's own connections)."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from rpc_server.db.stock_engine import stock_engine

MIGRATIONS = "rpc_server.db:migrations"


class _ContextChatter(logging.Filter):
    """Drops the two INFO lines Alembic logs whenever a ``MigrationContext`` is made
    ("Context impl SQLiteImpl.", "Will assume non-transactional DDL."): each
    ``rpc-server migrate`` makes one. "Running upgrade" stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl ", "Will assume "))


def quiet_alembic_context_lines() -> None:
    """Install ``_ContextChatter`` on Alembic's migration logger (once per process)."""
    logger = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _ContextChatter) for f in logger.filters):
        logger.addFilter(_ContextChatter())


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def check_sqlite_foreign_keys(connection: Connection) -> None:
    """Raise if any row refers to a row that does not exist (SQLite's own check)."""
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if violations:
        raise RuntimeError(f"foreign key violations after migrating: {violations[:10]}")


async def migrate(database_url: str, revision: str = "head") -> None:
    """Create or upgrade the schema of ``database_url`` to ``revision``."""
    # SQLite alters a table by copying it to a new one, dropping the old one and renaming
    # the copy (Alembic's batch mode); with foreign keys on, dropping a table that other
    # rows refer to fails, and the pragma cannot change inside the migration's
    # transaction. So they are off, and ``check_sqlite_foreign_keys`` checks every
    # reference before the commit.
    engine = stock_engine(database_url, foreign_keys=False, poolclass=NullPool)
    sqlite = engine.dialect.name == "sqlite"

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
