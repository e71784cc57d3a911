"""Alembic migrations produce exactly the schema the models declare."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from models import Base
from rpc_server.database import create_engine
from rpc_server.migrate import migrate
from tests import databases
from tests.conftest import POSTGRES_ADMIN_URL, sqlite_url


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


def describe(sync: Connection) -> dict[str, Any]:
    """The schema as both engines can report it: names, columns, keys, indexes, checks."""
    inspector = inspect(sync)
    schema: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        schema[table] = {
            "columns": sorted(
                (c["name"], c["nullable"], c["type"].python_type.__name__)
                for c in inspector.get_columns(table)
            ),
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"])
                for fk in inspector.get_foreign_keys(table)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
                if not i.get("duplicates_constraint")
            ),
            "checks": sorted(c["name"] for c in inspector.get_check_constraints(table)),
        }
    return schema


async def describe_url(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(describe)
    finally:
        await engine.dispose()


@pytest.mark.backends("postgresql")
def test_sqlite_and_postgresql_get_the_same_schema(
    backend: str, migrated_template: Path, postgres_template: str
) -> None:
    assert POSTGRES_ADMIN_URL is not None
    on_sqlite = asyncio.run(describe_url(sqlite_url(migrated_template)))
    on_postgres = asyncio.run(
        describe_url(databases.with_database(POSTGRES_ADMIN_URL, postgres_template))
    )
    assert on_sqlite == on_postgres
    assert {"purchases", "receipt_outbox", "alembic_version"} <= set(on_sqlite)
