"""indexes for the statements that read more than they answer

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 16:30:00

- ``receipt_outbox (claim_token) WHERE claim_token IS NOT NULL``: a claim's rows, read
  back, renewed and released by their token (every receipt was read for each claim).
- ``course_registrations (user_id, course_id)``: whether a buyer already holds a course,
  at each purchase.create (every registration of the buyer was read; on PostgreSQL a
  buyer with most of the rows got a scan of the whole table).
- ``purchases (owner_id, state, id)``: a buyer's purchases in one state, in page order;
  it also counts a buyer's open purchases, so it replaces ``(owner_id) WHERE state =
  'pending'``.
- ``purchases (state, id)``: everyone's purchases in one state, in page order.

No data changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIMED = sa.text("claim_token IS NOT NULL")
PENDING_ONLY = sa.text("state = 'pending'")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        "ix_receipt_outbox_claim_token",
        "receipt_outbox",
        ["claim_token"],
        sqlite_where=CLAIMED,
        postgresql_where=CLAIMED,
    )
    op.create_index(
        "ix_course_registrations_user_id_course_id",
        "course_registrations",
        ["user_id", "course_id"],
    )
    op.create_index("ix_purchases_owner_id_state_id", "purchases", ["owner_id", "state", "id"])
    op.create_index("ix_purchases_state_id", "purchases", ["state", "id"])
    op.drop_index("ix_purchases_owner_id_pending", table_name="purchases")


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index(
        "ix_purchases_owner_id_pending",
        "purchases",
        ["owner_id"],
        sqlite_where=PENDING_ONLY,
        postgresql_where=PENDING_ONLY,
    )
    op.drop_index("ix_purchases_state_id", table_name="purchases")
    op.drop_index("ix_purchases_owner_id_state_id", table_name="purchases")
    op.drop_index("ix_course_registrations_user_id_course_id", table_name="course_registrations")
    op.drop_index("ix_receipt_outbox_claim_token", table_name="receipt_outbox")
