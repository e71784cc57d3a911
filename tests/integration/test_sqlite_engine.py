"""The embedded engine is tuned for a server: WAL, busy timeout, foreign keys, IMMEDIATE writes."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.database import SQLITE_BUSY_TIMEOUT_MS
from rpc_server.domain import services
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from tests.conftest import World


@pytest.mark.backends("sqlite")
async def test_pragmas(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        journal = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
        timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        foreign_keys = (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar()
    assert (journal, timeout, foreign_keys) == ("wal", SQLITE_BUSY_TIMEOUT_MS, 1)


async def test_uncommitted_unit_of_work_rolls_back(
    uow_factory: SqlUnitOfWorkFactory, engine: AsyncEngine
) -> None:
    async with uow_factory(write=True) as uow:
        await uow.courses.save(slug="temp", title="T", price=Decimal("1.00"), currency="USD")
    async with engine.connect() as connection:
        count = (await connection.execute(text("SELECT count(*) FROM courses"))).scalar()
    assert count == 0


async def test_database_refuses_a_second_registration(
    uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    async with uow_factory(write=True) as uow:
        await uow.registrations.add(purchase, now=purchase.created_at)
        await uow.commit()
    async with uow_factory(write=True) as uow:
        with pytest.raises(IntegrityError):
            await uow.registrations.add(purchase, now=purchase.created_at)


async def test_concurrent_read_then_write_transactions_do_not_lock(
    uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    """50 concurrent read-then-write units of work: BEGIN IMMEDIATE serializes them."""
    purchases = await asyncio.gather(
        *(
            services.create_purchase(
                uow_factory, world.alice.actor, course="python-basics", idempotency_key=f"k{i % 5}"
            )
            for i in range(50)
        )
    )
    assert len({p.purchase_id for p in purchases}) == 5
