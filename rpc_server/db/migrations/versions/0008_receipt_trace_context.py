"""receipt_outbox.trace_context: the trace a receipt's delivery continues

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 08:30:00

With tracing on (``RPC_SERVER_TRACING``), the call that queues a receipt stores its W3C
``traceparent`` with the outbox row, and the deliverer's span for that receipt continues
the same trace (``rpc_server.observability.tracing``). NULL: the call was not traced (every
row written before this revision, or with tracing off). A nullable column without a
default: no row is rewritten, on either engine.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("receipt_outbox") as batch:
        batch.add_column(sa.Column("trace_context", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("receipt_outbox") as batch:
        batch.drop_column("trace_context")
