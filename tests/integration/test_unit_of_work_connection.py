"""Units of work on the driver's connection: errors, rollbacks and the pool, on both engines.

Statements are compiled by SQLAlchemy and run on the pooled driver connection
(``database.UnitOfWorkConnection``); these tests hold it to what SQLAlchemy's own
execution guaranteed: SQLAlchemy's exception classes, nothing kept that was not
committed, and every connection back in the pool whatever happened to the call.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from models import User as UserRow
from rpc_server.domain import services
from rpc_server.drivers import AsyncpgDriver, SqliteDriver
from rpc_server.sqlite_driver import OneHopConnection
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from tests.conftest import World


async def in_transaction(connection: Any) -> bool:
    if isinstance(connection, OneHopConnection):
        return connection._in_transaction()
    return bool(connection.is_in_transaction())


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def count_users(uow_factory: SqlAlchemyUnitOfWorkFactory) -> int:
    async with uow_factory() as uow:
        return int(await uow.connection.scalar(select(func.count()).select_from(UserRow)))


async def test_a_duplicate_is_sqlalchemys_integrity_error_and_nothing_is_kept(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World
) -> None:
    users = await count_users(uow_factory)
    now = datetime.now(UTC)
    with pytest.raises(IntegrityError):
        async with uow_factory(write=True) as uow:
            await uow.connection.execute(
                insert(UserRow).values(email="new@example.com", is_staff=False, created_at=now)
            )
            await uow.connection.execute(
                insert(UserRow).values(email=world.alice.email, is_staff=False, created_at=now)
            )
    assert await count_users(uow_factory) == users  # the first insert was rolled back
    assert checked_out(uow_factory.engine) == 0


async def test_values_come_back_as_python_values(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World
) -> None:
    """SQLite keeps decimals, datetimes and booleans as text, floats and integers: they
    come back as Python's, as SQLAlchemy's result processing made them."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    async with uow_factory() as uow:
        found = await uow.purchases.get(purchase.purchase_id, owner_id=None)
        staff = await uow.connection.scalar(
            select(UserRow.is_staff).where(UserRow.email == "support@example.com")
        )
    assert found == purchase
    assert found is not None and isinstance(found.amount, Decimal)
    assert found.created_at.tzinfo is not None and found.created_at <= datetime.now(UTC)
    assert staff is True


@pytest.mark.parametrize("where", ["rollback", "statement"])
async def test_a_call_cancelled_mid_unit_of_work_gives_its_connection_back(
    where: str,
    uow_factory: SqlAlchemyUnitOfWorkFactory,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call timeout cancels the call wherever it waits, even in the unit of work's
    closing rollback: the connection must not stay checked out (the pool would shrink by
    one per timeout) nor go back with a transaction open."""
    engine = uow_factory.engine
    stuck = asyncio.Event()
    driver = SqliteDriver if engine.dialect.name == "sqlite" else AsyncpgDriver
    # "statement": the second statement (the first opened the transaction) never ends;
    # "rollback": the closing rollback never ends.
    hung = "fetch" if where == "statement" else "rollback"
    original = getattr(driver, hung)

    async def hang(self: Any, connection: Any, *args: Any) -> Any:
        if where == "rollback" and not await in_transaction(connection):
            return await original(self, connection, *args)
        stuck.set()
        await asyncio.Event().wait()  # never set: only a cancellation ends this

    monkeypatch.setattr(driver, hung, hang)

    async def call() -> None:
        async with uow_factory(write=True) as uow:
            await uow.courses.list_all()
            await uow.courses.list_all()

    task = asyncio.create_task(call())
    await asyncio.wait_for(stuck.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    assert checked_out(engine) == 0
    # Whatever was interrupted, the pool serves the next unit of work, outside a
    # transaction.
    assert await count_users(uow_factory) == 3
    async with uow_factory(write=True) as uow:
        assert len(await uow.courses.list_all()) == 2
