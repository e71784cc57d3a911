"""Databases without the latest schema, for the tests of what refuses them.

``unmigrated_database`` makes a database that exists but has no schema at all (an empty
SQLite file, an empty PostgreSQL database, dropped afterwards); ``migrate(url, OLDER)``
then puts it a migration behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

import rpc_server
from rpc_server.db.stock_engine import stock_engine
from tests import databases
from tests.conftest import POSTGRES_ADMIN_URL, sqlite_url

# A schema behind the latest: the one before the trusted-fulfillment migration (0004).
OLDER_REVISION = "0003"
# The newest migration shipped, read from the files (not from the code under test).
LATEST_REVISION = max(
    path.name.split("_")[0]
    for path in (Path(rpc_server.__file__).parent / "db" / "migrations" / "versions").glob(
        "[0-9]*_*.py"
    )
)


@contextmanager
def unmigrated_database(backend: str, directory: Path) -> Iterator[str]:
    """Yield the URL of an existing database with no schema, on ``backend``."""
    if backend == "sqlite":
        path = directory / "empty.sqlite3"
        path.touch()
        yield sqlite_url(path)
        return
    assert POSTGRES_ADMIN_URL is not None
    url = asyncio.run(databases.create_empty(POSTGRES_ADMIN_URL))
    try:
        yield url
    finally:
        asyncio.run(databases.drop(POSTGRES_ADMIN_URL, make_url(url).database or ""))


async def tables_of(url: str) -> set[str]:
    engine = stock_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: set(sync.dialect.get_table_names(sync)))
    finally:
        await engine.dispose()


async def set_revision(url: str, revision: str) -> None:
    """Make the database claim ``revision`` (as if migrated there), changing nothing else."""
    engine = stock_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(
                f"UPDATE alembic_version SET version_num = '{revision}'"
            )
    finally:
        await engine.dispose()
