"""Whether a database's schema is at the latest migration (Alembic's head).

Asked before anything uses a database: the CLI's commands (``rpc-server migrate`` is the
remedy they name), ``serve`` before it starts, and ``GET /readyz`` (``readiness``). The
answer compares the head of the migrations shipped with this code (Alembic's
``ScriptDirectory.get_current_head``) with the revision the database records in Alembic's
``alembic_version`` table, read on the server's own engine (``rpc_server.db``) so that
asking needs no second connection pool.
"""

from __future__ import annotations

from functools import cache

from alembic.script import ScriptDirectory
from sqlalchemy import text

from rpc_server.db.connection import Engine, UnitOfWorkConnection
from rpc_server.db.engines import autocommit
from rpc_server.db.migrate import alembic_config

MIGRATE_HINT = "run rpc-server migrate"


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this code needs; the message says why."""


@cache
def _scripts() -> tuple[str, frozenset[str]]:
    """The head revision and every revision the shipped migrations know (read once)."""
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if head is None:  # a package without migrations: nothing could ever be current
        raise RuntimeError("no Alembic migrations found in rpc_server.db.migrations")
    return head, frozenset(script.revision for script in scripts.walk_revisions())


def head_revision() -> str:
    """The latest migration shipped with this code."""
    return _scripts()[0]


# Whether Alembic's table exists, per engine; then the revision it records (the
# migrations are linear: one row).
_VERSION_TABLE_EXISTS = {
    "sqlite": text(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
    ),
    "postgresql": text(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'alembic_version'"
        " AND schemaname = current_schema()"
    ),
}
_VERSION = text("SELECT version_num FROM alembic_version")


async def current_revision(connection: UnitOfWorkConnection, dialect: str) -> str | None:
    """The revision the database records; None if it has no schema (never migrated)."""
    if not await connection.scalar(_VERSION_TABLE_EXISTS[dialect]):
        return None
    revision = await connection.scalar(_VERSION)
    return None if revision is None else str(revision)


def schema_problem(revision: str | None) -> str | None:
    """Why a database at ``revision`` cannot be used, in one line; None if it can."""
    head, known = _scripts()
    if revision == head:
        return None
    if revision is None:
        return f"the database has no schema yet: {MIGRATE_HINT}"
    if revision in known:
        return (
            f"the database schema is at revision {revision}, not at the latest "
            f"migration {head}: {MIGRATE_HINT}"
        )
    return (
        f"the database schema is at revision {revision}, which this version of rpc-server "
        f"does not know (a newer version migrated it): run that version, or restore a backup"
    )


async def check_schema(engine: Engine) -> None:
    """Raise ``SchemaNotCurrent`` unless the database is at the latest migration.

    Connection errors propagate as they are (the database cannot be reached at all).
    """
    async with autocommit(engine) as connection:
        revision = await current_revision(connection, engine.dialect_name)
    problem = schema_problem(revision)
    if problem is not None:
        raise SchemaNotCurrent(problem)
