"""announce every purchase event on PostgreSQL (NOTIFY purchase_events, '<seq>')

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 19:40:00

Live subscriptions (``rpc_server.live``) fan out across server processes and hosts through
PostgreSQL: a trigger on ``purchase_events`` runs ``pg_notify('purchase_events', seq)`` in
the transaction that appends the event, whoever appends it (a server process, the CLI, a
script). PostgreSQL delivers notifications at commit, in commit order, and never for a
transaction that rolled back. The payload is the sequence number alone (payloads are
limited to 8000 bytes): listeners read the events themselves.

SQLite: nothing (one process; its feed is woken in-process). No data changes.
"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "purchase_events"


def upgrade() -> None:
    """Upgrade schema."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION notify_purchase_event() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.seq::text);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER purchase_events_notify
        AFTER INSERT ON purchase_events
        FOR EACH ROW EXECUTE FUNCTION notify_purchase_event()
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER purchase_events_notify ON purchase_events")
    op.execute("DROP FUNCTION notify_purchase_event()")
