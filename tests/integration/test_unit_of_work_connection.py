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
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from models import User as UserRow
from rpc_server.connection_pool import PoolGate
from rpc_server.db.stock_engine import stock_engine
from rpc_server.domain import services
from rpc_server.drivers import AsyncpgDriver, SqliteDriver
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from tests.conftest import World


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def count_users(uow_factory: SqlUnitOfWorkFactory) -> int:
    async with uow_factory() as uow:
        return int(await uow.connection.scalar(select(func.count()).select_from(UserRow)))


async def test_a_duplicate_is_sqlalchemys_integrity_error_and_nothing_is_kept(
    uow_factory: SqlUnitOfWorkFactory, world: World
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
    uow_factory: SqlUnitOfWorkFactory, world: World
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
    uow_factory: SqlUnitOfWorkFactory,
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
        if where == "rollback" and not self.in_transaction(connection):
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
    assert await count_users(uow_factory) == 4  # the world's: alice, bob, staff, payments
    async with uow_factory(write=True) as uow:
        assert len(await uow.courses.list_all()) == 2


async def test_units_of_work_beyond_the_pool_wait_their_turn(database_url: str) -> None:
    """Twenty units of work on two connections: each waits for one to come back (not for
    the pool timeout), and every connection is back at the end."""
    engine = stock_engine(database_url, pool_size=2, max_overflow=0, pool_timeout=5)
    uow_factory = SqlUnitOfWorkFactory(engine)
    in_use = {"now": 0, "most": 0}

    async def call() -> None:
        async with uow_factory() as uow:
            await uow.courses.list_all()
            in_use["now"] += 1
            in_use["most"] = max(in_use["most"], in_use["now"])
            await asyncio.sleep(0.01)  # holding the connection
            in_use["now"] -= 1

    try:
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(call() for _ in range(20)))
        elapsed = asyncio.get_running_loop().time() - started
        assert in_use["most"] == 2
        assert elapsed < 2.0  # ten turns of ~10 ms, nowhere near the 5 s timeout
        assert checked_out(engine) == 0
    finally:
        await engine.dispose()


async def test_waiting_for_a_connection_times_out_as_the_pool_does(database_url: str) -> None:
    engine = stock_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    gate = PoolGate(engine)
    try:
        held = await gate.checkout()
        started = asyncio.get_running_loop().time()
        with pytest.raises(PoolTimeoutError):
            await gate.checkout()
        assert 0.25 < asyncio.get_running_loop().time() - started < 2.0
        await gate.give_back(held)
        again = await asyncio.wait_for(gate.checkout(), 1)  # the pool still serves
        await gate.give_back(again)
        assert checked_out(engine) == 0
    finally:
        await engine.dispose()


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_connection_on(
    database_url: str,
) -> None:
    """The connection that came back for a call that was cancelled at that moment (its
    timeout) goes to the next waiting call, rather than idling until that one times out."""
    engine = stock_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    gate = PoolGate(engine)
    try:
        held = await gate.checkout()
        first = asyncio.create_task(gate.checkout())
        second = asyncio.create_task(gate.checkout())
        await asyncio.sleep(0.05)  # both are waiting
        await gate.give_back(held)  # wakes the first waiter…
        first.cancel()  # …which is cancelled before it runs
        taken = await asyncio.wait_for(second, 1)
        with pytest.raises(asyncio.CancelledError):
            await first
        await gate.give_back(taken)
        assert checked_out(engine) == 0
    finally:
        await engine.dispose()
