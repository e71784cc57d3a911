"""What ``GET /readyz`` answers: whether this process can serve calls now.

Ready means the database answers and its schema is at the latest migration
(``schema_version``): a database that answers but was never migrated, or is a migration
behind, would fail every call (-32603), so it is not ready. The schema is read once per
process while it is right (the positive answer is kept); afterwards a probe costs one
``SELECT 1``. After any failure the schema is read again on the next probe, since the
database may have been replaced or restored meanwhile.
"""

from __future__ import annotations

from sqlalchemy import text

from rpc_server.db.connection import Engine
from rpc_server.db.engines import autocommit
from rpc_server.db.schema_version import current_revision, schema_problem

_PING = text("SELECT 1")

SCHEMA_NOT_CURRENT = "schema not at the latest migration"


class Readiness:
    """One process's readiness probe; keeps "the schema is current" once it has seen it."""

    def __init__(self) -> None:
        self._schema_current = False

    async def problem(self, engine: Engine) -> str | None:
        """Why the process is not ready, for the client (no internals); None when ready.

        Raises whatever the database raises when it cannot be reached (the caller
        answers 503 and must call ``forget``).
        """
        async with autocommit(engine) as connection:
            if self._schema_current:
                await connection.execute(_PING)
                return None
            revision = await current_revision(connection, engine.dialect_name)
        self._schema_current = schema_problem(revision) is None
        return None if self._schema_current else SCHEMA_NOT_CURRENT

    def forget(self) -> None:
        """Read the schema again on the next probe."""
        self._schema_current = False
