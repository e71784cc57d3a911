"""token scopes, payment references, the purchase events audit trail

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:30:00

Data: every existing token gets a scope (``staff`` for the tokens of staff users,
``buyer`` for the rest), and every existing purchase gets one event recording the state
it was in when its history began (``source`` ``migration``, ``seq`` its row id), so
``purchase.events`` is never empty and the sequence continues after them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("scope", sa.String(length=16), server_default="buyer", nullable=False)
        )
        batch_op.create_check_constraint("scope_known", "scope IN ('buyer', 'staff', 'payments')")
    op.execute(
        "UPDATE api_tokens SET scope = 'staff' "
        "WHERE user_id IN (SELECT id FROM users WHERE is_staff)"
    )
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("payment_ref", sa.String(length=255), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_purchases_payment_ref"), ["payment_ref"])

    op.create_table(
        "event_sequence",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_event_sequence_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_sequence")),
    )
    op.create_table(
        "purchase_events",
        sa.Column("seq", BIG_ID, autoincrement=False, nullable=False),
        sa.Column("purchase_id", BIG_ID, nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("actor_user_id", BIG_ID, nullable=True),
        sa.Column("actor_scope", sa.String(length=16), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("evidence", sa.String(length=16), nullable=True),
        sa.Column("payment_event_id", sa.String(length=255), nullable=True),
        sa.Column("payment_ref", sa.String(length=255), nullable=True),
        sa.Column("error_msg", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "to_state IN ('pending', 'fulfilled', 'failed', 'canceled')",
            name=op.f("ck_purchase_events_to_state_known"),
        ),
        sa.CheckConstraint(
            "source IN ('rpc', 'webhook', 'cli', 'migration')",
            name=op.f("ck_purchase_events_source_known"),
        ),
        sa.CheckConstraint(
            "actor_scope IN ('buyer', 'staff', 'payments')",
            name=op.f("ck_purchase_events_actor_scope_known"),
        ),
        sa.CheckConstraint(
            "evidence IN ('payment_event', 'payments_scope', 'staff_comp')",
            name=op.f("ck_purchase_events_evidence_known"),
        ),
        sa.ForeignKeyConstraint(
            ["actor_user_id"], ["users.id"], name=op.f("fk_purchase_events_actor_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["purchase_id"], ["purchases.id"], name=op.f("fk_purchase_events_purchase_id_purchases")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_purchase_events")),
    )
    with op.batch_alter_table("purchase_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_purchase_events_purchase_id_seq", ["purchase_id", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_purchase_events_payment_event_id"), ["payment_event_id"], unique=False
        )

    # Each purchase's history begins with the state it is in now.
    op.execute(
        "INSERT INTO purchase_events (seq, purchase_id, from_state, to_state, source, "
        "error_msg, created_at) "
        "SELECT id, id, NULL, state, 'migration', error_msg, updated_at FROM purchases"
    )
    op.execute(
        "INSERT INTO event_sequence (id, last_seq) "
        "SELECT 1, COALESCE(MAX(seq), 0) FROM purchase_events"
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("purchase_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_purchase_events_payment_event_id"))
        batch_op.drop_index("ix_purchase_events_purchase_id_seq")
    op.drop_table("purchase_events")
    op.drop_table("event_sequence")
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_purchases_payment_ref"), type_="unique")
        batch_op.drop_column("payment_ref")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_constraint("ck_api_tokens_scope_known", type_="check")
        batch_op.drop_column("scope")
