"""``receipt_outbox.status`` holds an ``OutboxStatus`` and nothing else, whatever writes it:
the database's CHECK constraint ``ck_receipt_outbox_status_known``, on SQLite and
PostgreSQL.

The constraint has been in the schema since the first migration (0001) and survives
every later one (SQLite's batch mode copies the table); these tests write around the
application, with plain SQL, as a script or an older release could.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.outbox import OutboxStatus
from tests.conftest import World

CHECK_NAME = "ck_receipt_outbox_status_known"
INSERT = text(
    "INSERT INTO receipt_outbox (purchase_id, recipient, status, attempts, next_attempt_at, "
    "created_at) VALUES (:purchase_id, 'alice@example.com', :status, 0, :now, :now)"
)


async def pending_purchase_pk(uow_factory: SqlUnitOfWorkFactory, world: World) -> int:
    """A purchase without a receipt yet (one receipt per purchase is UNIQUE)."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    return purchase.pk


async def execute(engine: AsyncEngine, statement: Any, params: dict[str, Any]) -> None:
    async with engine.begin() as connection:
        await connection.execute(statement, params)


@pytest.mark.parametrize("status", ["bogus", "PENDING", "Sent", "", "failed"])
async def test_inserting_another_status_fails(
    status: str, engine: AsyncEngine, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    pk = await pending_purchase_pk(uow_factory, world)
    now = datetime.now(UTC)
    with pytest.raises(IntegrityError, match=CHECK_NAME):
        await execute(engine, INSERT, {"purchase_id": pk, "status": status, "now": now})
    # The same row with a known status goes in: it was the status that was refused.
    await execute(engine, INSERT, {"purchase_id": pk, "status": "pending", "now": now})
    async with uow_factory() as uow:
        assert await uow.receipts.counts() == {OutboxStatus.PENDING: 1}


async def test_updating_to_another_status_fails(
    engine: AsyncEngine, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    pk = await pending_purchase_pk(uow_factory, world)
    now = datetime.now(UTC)
    await execute(engine, INSERT, {"purchase_id": pk, "status": "dead", "now": now})
    with pytest.raises(IntegrityError, match=CHECK_NAME):
        await execute(engine, text("UPDATE receipt_outbox SET status = 'resend'"), {})
    for status in OutboxStatus:
        await execute(engine, text("UPDATE receipt_outbox SET status = :s"), {"s": status.value})
        async with uow_factory() as uow:
            [entry] = await uow.receipts.overview(limit=10)
        assert entry.status is status


async def test_the_migrated_schema_names_the_check_with_every_status(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        checks = await connection.run_sync(
            lambda sync: inspect(sync).get_check_constraints("receipt_outbox")
        )
    [check] = [c for c in checks if c["name"] == CHECK_NAME]
    # PostgreSQL reports the condition in its own words (``= ANY (ARRAY[…])``).
    assert all(f"'{status.value}'" in check["sqltext"] for status in OutboxStatus), check
