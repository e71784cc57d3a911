"""The embedded engine is tuned for a server: WAL, busy timeout, foreign keys, IMMEDIATE writes."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.connection import Engine
from rpc_server.db.sqlite import BUSY_TIMEOUT_MS
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World


@pytest.mark.backends("sqlite")
async def test_pragmas(db_engine: Engine, engine: AsyncEngine) -> None:
    """The server's connections and the stock engine (Alembic's) are tuned alike."""
    pragmas = ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
    connection = await db_engine.acquire()
    try:
        server = [(await db_engine.fetch(connection, f"PRAGMA {p}", ()))[0][0] for p in pragmas]
    finally:
        await db_engine.release(connection)
    async with engine.connect() as stock:
        alembic = [(await stock.exec_driver_sql(f"PRAGMA {p}")).scalar() for p in pragmas]
    normal = 1  # synchronous=NORMAL
    assert server == alembic == ["wal", BUSY_TIMEOUT_MS, 1, normal]


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
