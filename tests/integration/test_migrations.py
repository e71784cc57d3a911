"""Alembic migrations produce exactly the schema the models declare."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from models import Base
from rpc_server.database import create_engine
from rpc_server.migrate import migrate
from tests.conftest import sqlite_url


async def test_migrated_schema_matches_models(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fresh.sqlite3")
    await migrate(url)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
            tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    finally:
        await engine.dispose()
    assert diff == []
    assert set(Base.metadata.tables) <= tables


async def test_migrate_twice_is_a_no_op(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "twice.sqlite3")
    await migrate(url)
    await migrate(url)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            version = (
                await connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            ).all()
    finally:
        await engine.dispose()
    assert len(version) == 1
