"""number a purchase event in the statement that appends it, on SQLite too

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:10:00

A purchase event takes the next number of ``event_sequence`` in the same statement that
inserts it (``rpc_server.db.repositories.events``). On PostgreSQL the sequence's UPDATE
runs in a WITH of that INSERT, and nothing in the schema changes. SQLite has no UPDATE
inside a WITH: its INSERT reads ``last_seq + 1``, and this trigger moves ``last_seq`` to
the new row's seq, in the same statement and transaction (SQLite's writers are
serialized, so no two writers read the same ``last_seq``). The counter never goes back:
a row inserted with a lower seq leaves it where it is. No data changes.
"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        """
        CREATE TRIGGER purchase_events_sequence
        AFTER INSERT ON purchase_events
        BEGIN
            UPDATE event_sequence SET last_seq = NEW.seq WHERE id = 1 AND last_seq < NEW.seq;
        END
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP TRIGGER purchase_events_sequence")
