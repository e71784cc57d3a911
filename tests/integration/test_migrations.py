"""Alembic migrations produce exactly the schema the models declare."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from models import Base
from rpc_server.db.engines import autocommit, open_engine
from rpc_server.db.migrate import migrate
from rpc_server.db.schema_version import (
    SchemaNotCurrent,
    check_schema,
    current_revision,
    head_revision,
)
from rpc_server.db.stock_engine import stock_engine
from tests import databases
from tests.conftest import POSTGRES_ADMIN_URL, sqlite_url
from tests.unmigrated import (
    LATEST_REVISION,
    OLDER_REVISION,
    set_revision,
    unmigrated_database,
)


async def test_migrated_schema_matches_models(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fresh.sqlite3")
    await migrate(url)
    engine = stock_engine(url)
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
    engine = stock_engine(url)
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
    engine = stock_engine(url)
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


# --- where a database's schema stands (rpc_server.db.schema_version) -------------------------


@pytest.fixture
def unmigrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with unmigrated_database(backend, tmp_path) as url:
        yield url


async def revision_of(url: str) -> str | None:
    engine = open_engine(url)
    try:
        async with autocommit(engine) as connection:
            return await current_revision(connection, engine.dialect_name)
    finally:
        await engine.close()


async def schema_check(url: str) -> str | None:
    """What ``check_schema`` says of the database: None, or its SchemaNotCurrent message."""
    engine = open_engine(url)
    try:
        await check_schema(engine)
    except SchemaNotCurrent as exc:
        return str(exc)
    finally:
        await engine.close()
    return None


def test_the_head_is_the_newest_migration_shipped() -> None:
    assert head_revision() == LATEST_REVISION  # the newest file in migrations/versions


async def test_check_schema_follows_the_database_from_empty_to_the_latest_migration(
    unmigrated_url: str,
) -> None:
    assert await revision_of(unmigrated_url) is None
    assert await schema_check(unmigrated_url) == (
        "the database has no schema yet: run rpc-server migrate"
    )
    await migrate(unmigrated_url, OLDER_REVISION)
    assert await revision_of(unmigrated_url) == OLDER_REVISION
    assert await schema_check(unmigrated_url) == (
        f"the database schema is at revision {OLDER_REVISION}, not at the latest migration "
        f"{LATEST_REVISION}: run rpc-server migrate"
    )
    await migrate(unmigrated_url)
    assert await revision_of(unmigrated_url) == LATEST_REVISION
    assert await schema_check(unmigrated_url) is None


async def test_a_schema_newer_than_this_code_is_not_current_and_not_for_migrate(
    database_url: str,
) -> None:
    await set_revision(database_url, "9999")
    assert await schema_check(database_url) == (
        "the database schema is at revision 9999, which this version of rpc-server does not "
        "know (a newer version migrated it): run that version, or restore a backup"
    )
