"""Whether a database's schema is at the latest migration (Alembic's head).

Asked before anything uses a database: the CLI's commands (``rpc-server migrate`` is the
remedy they name), ``serve`` before it starts, and ``GET /readyz`` (``readiness``). The
answer comes from Alembic's public API: the head of the migrations shipped with this
code (``ScriptDirectory.get_current_head``) against the revision the database records
(``MigrationContext.get_current_revision``).
"""

from __future__ import annotations

import logging
from functools import cache

from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.migrate import alembic_config

MIGRATE_HINT = "run rpc-server migrate"


class _ContextChatter(logging.Filter):
    """Drops the two INFO lines Alembic logs whenever a ``MigrationContext`` is made
    ("Context impl SQLiteImpl.", "Will assume non-transactional DDL."): reading the
    revision makes one per command and per readiness probe. "Running upgrade" stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl ", "Will assume "))


def quiet_alembic_context_lines() -> None:
    """Install ``_ContextChatter`` on Alembic's migration logger (once per process)."""
    logger = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _ContextChatter) for f in logger.filters):
        logger.addFilter(_ContextChatter())


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this code needs; the message says why."""


@cache
def _scripts() -> tuple[str, frozenset[str]]:
    """The head revision and every revision the shipped migrations know (read once)."""
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if head is None:  # a package without migrations: nothing could ever be current
        raise RuntimeError("no Alembic migrations found in rpc_server.migrations")
    return head, frozenset(script.revision for script in scripts.walk_revisions())


def head_revision() -> str:
    """The latest migration shipped with this code."""
    return _scripts()[0]


def current_revision(connection: Connection) -> str | None:
    """The revision the database records; None if it has no schema (never migrated)."""
    quiet_alembic_context_lines()  # in every process that asks (server workers too)
    return MigrationContext.configure(connection).get_current_revision()


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


async def check_schema(engine: AsyncEngine) -> None:
    """Raise ``SchemaNotCurrent`` unless the database is at the latest migration.

    Connection errors propagate as they are (the database cannot be reached at all).
    """
    async with engine.connect() as connection:
        revision = await connection.run_sync(current_revision)
    problem = schema_problem(revision)
    if problem is not None:
        raise SchemaNotCurrent(problem)
