"""indexes for registration.list paging and the cap on open purchases

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:00:00

``course_registrations (user_id, id)`` replaces the index on ``user_id`` alone: it holds
a user's registrations in page order, as ``purchases (owner_id, id)`` does for
purchases (and still serves lookups by user). ``purchases (owner_id) WHERE state =
'pending'`` holds only open purchases, so counting a user's against the cap reads those
alone. No data changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_ONLY = sa.text("state = 'pending'")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index("ix_course_registrations_user_id_id", "course_registrations", ["user_id", "id"])
    op.drop_index("ix_course_registrations_user_id", table_name="course_registrations")
    op.create_index(
        "ix_purchases_owner_id_pending",
        "purchases",
        ["owner_id"],
        sqlite_where=PENDING_ONLY,
        postgresql_where=PENDING_ONLY,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_purchases_owner_id_pending", table_name="purchases")
    op.create_index("ix_course_registrations_user_id", "course_registrations", ["user_id"])
    op.drop_index("ix_course_registrations_user_id_id", table_name="course_registrations")
