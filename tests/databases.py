"""Test databases: a migrated SQLite file copied per test, or a PostgreSQL database per test.

PostgreSQL is used when ``RPC_SERVER_TEST_DATABASE_URL`` names one (for example
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``): the session migrates one
template database, and every test gets ``CREATE DATABASE … TEMPLATE`` of it, dropped
afterwards (``create_empty`` makes one without any schema instead). The URL's own
database is only used to issue those commands.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
from sqlalchemy.engine import make_url

from rpc_server.db.migrate import migrate

TEST_DATABASE_URL_VARIABLE = "RPC_SERVER_TEST_DATABASE_URL"


def postgres_admin_url() -> str | None:
    """The PostgreSQL URL the tests may use, or None to test on SQLite only."""
    url = os.environ.get(TEST_DATABASE_URL_VARIABLE, "").strip()
    if not url:
        return None
    if make_url(url).get_backend_name() != "postgresql":
        raise RuntimeError(f"{TEST_DATABASE_URL_VARIABLE} must be a postgresql+asyncpg:// URL")
    return url


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(_dsn(url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def create_template(admin_url: str) -> str:
    """Create and migrate a template database; return its name."""
    name = f"rpc_template_{uuid.uuid4().hex[:12]}"
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    await migrate(with_database(admin_url, name))
    return name


async def create_empty(admin_url: str) -> str:
    """Create an empty database (no schema at all, not even Alembic's); return its URL.

    For tests that migrate it themselves, to an older revision for instance.
    """
    name = f"rpc_test_{uuid.uuid4().hex[:12]}"
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


async def create_from_template(admin_url: str, template: str) -> str:
    """Create a fresh database from the template; return its URL."""
    name = f"rpc_test_{uuid.uuid4().hex[:12]}"
    await _admin(admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return with_database(admin_url, name)


async def drop(admin_url: str, name: str) -> None:
    await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
