"""Units of work on the driver's connection: errors, rollbacks and the pool, on both engines.

Statements are compiled by SQLAlchemy and run on a connection of the driver's own pool
(``rpc_server.db.connection.UnitOfWorkConnection`` on ``SqliteEngine`` or
``PostgresEngine``); these tests hold it to what SQLAlchemy's own execution guaranteed:
SQLAlchemy's exception classes, nothing kept that was not committed, and every
connection back in the pool, outside a transaction, whatever happened to the call.

Whether every connection is back is asked of the pool itself: a pool of ``SIZE`` with a
short timeout must hand out ``SIZE`` connections at once (a leaked one would make the
last checkout time out), none of them inside a transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from models import User as UserRow
from rpc_server.db.connection import Engine
from rpc_server.db.engines import open_engine
from rpc_server.db.unit_of_work import SqlUnitOfWork, SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import PurchaseState
from rpc_server.jsonrpc.errors import SERVICE_UNAVAILABLE
from tests.conftest import World
from tests.integration.paying import pay_and_fulfil
from tests.unit.test_errors import error_of

SIZE = 2


@pytest.fixture
async def small_engine(database_url: str) -> AsyncIterator[Engine]:
    """The server's engine with a pool of ``SIZE`` and a short pool timeout."""
    engine = open_engine(database_url, pool_size=SIZE, pool_timeout=1.0)
    yield engine
    await engine.close()


def in_transaction(connection: Any) -> bool:
    """Whether a driver connection (aiosqlite's or asyncpg's) has a transaction open."""
    if isinstance(connection, aiosqlite.Connection):
        return connection.in_transaction
    return bool(connection.is_in_transaction())


async def assert_all_back(engine: Engine, size: int = SIZE) -> None:
    """None was kept by a call: ``size`` connections at once, none in a transaction. On
    SQLite, whose writers take turns with one connection each, the turn is free (else
    this waits 5 s) and each connection a writer takes is out of any transaction."""
    if engine.dialect_name == "sqlite":
        for _ in range(size):
            writer = await asyncio.wait_for(engine.acquire(write=True), 5)
            try:
                assert not in_transaction(writer)
            finally:
                await engine.release(writer)
    connections = [await asyncio.wait_for(engine.acquire(write=False), 5) for _ in range(size)]
    try:
        assert [in_transaction(c) for c in connections] == [False] * size
    finally:
        for connection in connections:
            await engine.release(connection)


async def count_users(uow_factory: SqlUnitOfWorkFactory) -> int:
    async with uow_factory() as uow:
        return await count_users_in(uow)


async def count_users_in(uow: SqlUnitOfWork) -> int:
    return int(await uow.connection.scalar(select(func.count()).select_from(UserRow)))


async def test_a_duplicate_is_sqlalchemys_integrity_error_and_nothing_is_kept(
    small_engine: Engine, world: World
) -> None:
    uow_factory = SqlUnitOfWorkFactory(small_engine)
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
    await assert_all_back(small_engine)


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


async def test_a_savepoint_needs_a_writing_unit_of_work(
    uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    """A savepoint opens a transaction, which a reading unit of work must not do (on
    SQLite its connection is shared with other reads): refused before anything is sent."""
    async with uow_factory() as uow:
        with pytest.raises(RuntimeError, match="write=True"):
            async with uow.connection.begin_nested():
                pass
        assert await count_users_in(uow) == 4  # the unit of work still reads
    async with uow_factory(write=True) as uow, uow.connection.begin_nested():
        assert await count_users_in(uow) == 4


@pytest.mark.parametrize(
    "target", [PurchaseState.FULFILLED, PurchaseState.FAILED, PurchaseState.CANCELED]
)
async def test_a_transition_returns_what_a_fresh_read_finds(
    uow_factory: SqlUnitOfWorkFactory, world: World, target: PurchaseState
) -> None:
    """What ``transition`` returns (its UPDATE's RETURNING), applied to the purchase as
    read before, is the purchase a later read finds: fulfil answers with it unread."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    later = purchase.created_at + timedelta(seconds=5, microseconds=123457)
    pending = frozenset({PurchaseState.PENDING})
    fulfilled = target is PurchaseState.FULFILLED
    async with uow_factory(write=True) as uow:
        change = await uow.purchases.transition(
            purchase.pk, sources=pending, target=target, now=later,
            error_msg="declined" if target is PurchaseState.FAILED else None,
            payment_ref="pi_returning" if fulfilled else None,
        )  # fmt: skip
        # No longer pending: the same UPDATE changes nothing and says so.
        again = await uow.purchases.transition(
            purchase.pk, sources=pending, target=target, error_msg=None, now=later
        )
        await uow.commit()
    async with uow_factory() as uow:
        stored = await uow.purchases.get(purchase.purchase_id, owner_id=None)
    assert change is not None and again is None
    assert change.applied_to(purchase) == stored
    assert stored is not None and stored.state is target and stored.updated_at == later
    assert stored.fulfilled_at == (later if fulfilled else None)


@pytest.mark.parametrize("where", ["rollback", "statement"])
async def test_a_call_cancelled_mid_unit_of_work_gives_its_connection_back(
    where: str, small_engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call timeout cancels the call wherever it waits, even in the unit of work's
    closing rollback: the connection must not stay checked out (the pool would shrink by
    one per timeout) nor go back with a transaction open."""
    uow_factory = SqlUnitOfWorkFactory(small_engine)
    stuck = asyncio.Event()
    # "statement": the second statement (the first opened the transaction) never ends;
    # "rollback": the closing rollback never ends.
    hung = "fetch" if where == "statement" else "rollback"
    original = getattr(small_engine, hung)

    async def hang(connection: Any, *args: Any) -> Any:
        if where == "rollback" and not in_transaction(connection):
            return await original(connection, *args)
        stuck.set()
        await asyncio.Event().wait()  # never set: only a cancellation ends this

    monkeypatch.setattr(small_engine, hung, hang)

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
    await assert_all_back(small_engine)
    # Whatever was interrupted, the pool serves the next unit of work.
    assert await count_users(uow_factory) == 4  # the world's: alice, bob, staff, payments
    async with uow_factory(write=True) as uow:
        assert len(await uow.courses.list_all()) == 2


async def test_units_of_work_beyond_the_pool_wait_their_turn(database_url: str) -> None:
    """Twenty units of work on two connections: each waits for one to come back (not for
    the pool timeout), and every connection is back at the end. (SQLite's reads share
    their connections unless told not to: ``test_sqlite_shared_readers.py``.)"""
    engine = open_engine(
        database_url, pool_size=2, max_overflow=0, pool_timeout=5, sqlite_readers=0
    )
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
        await assert_all_back(engine, 2)
    finally:
        await engine.close()


async def test_waiting_for_a_connection_times_out_with_service_unavailable(
    database_url: str,
) -> None:
    """A unit of work that finds every connection busy for the pool timeout fails with
    the pool's TimeoutError (-32000), and the pool serves again once one is back."""
    engine = open_engine(
        database_url, pool_size=1, max_overflow=0, pool_timeout=0.3, sqlite_readers=0
    )
    uow_factory = SqlUnitOfWorkFactory(engine)
    try:
        held = await engine.acquire()
        started = asyncio.get_running_loop().time()
        with pytest.raises(PoolTimeoutError) as raised:
            async with uow_factory() as uow:
                await uow.courses.list_all()
        assert 0.25 < asyncio.get_running_loop().time() - started < 2.0
        assert error_of(raised.value).code == SERVICE_UNAVAILABLE
        await engine.release(held)
        async with uow_factory() as uow:  # the pool still serves
            assert await asyncio.wait_for(uow.courses.list_all(), 1) == []
        await assert_all_back(engine, 1)
    finally:
        await engine.close()


async def test_waiters_are_served_in_the_order_they_came(database_url: str) -> None:
    engine = open_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    served: list[int] = []

    async def take(number: int) -> None:
        connection = await engine.acquire()
        served.append(number)
        await asyncio.sleep(0.005)
        await engine.release(connection)

    try:
        held = await engine.acquire()
        waiters = []
        for number in range(6):
            waiters.append(asyncio.create_task(take(number)))
            await asyncio.sleep(0.01)  # this one is waiting before the next comes
        await engine.release(held)
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert served == list(range(6))
    finally:
        await engine.close()


async def test_a_waiter_cancelled_while_waiting_leaves_its_turn_to_the_next(
    database_url: str,
) -> None:
    """A call cancelled while it waits for a connection (its timeout) takes none: the
    connection that comes back goes to the next waiting call."""
    engine = open_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        held = await engine.acquire()
        first = asyncio.create_task(engine.acquire())
        second = asyncio.create_task(engine.acquire())
        await asyncio.sleep(0.05)  # both are waiting
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await engine.release(held)
        taken = await asyncio.wait_for(second, 1)
        await engine.release(taken)
        await assert_all_back(engine, 1)
    finally:
        await engine.close()


# On PostgreSQL, asyncpg's pool hands the returned connection to the first waiter before
# ``release`` returns: by the time the caller could cancel it, it holds the connection
# (and gives it back when its unit of work closes). The race exists in our own pool only.
@pytest.mark.backends("sqlite")
async def test_a_waiter_cancelled_as_it_is_woken_passes_the_connection_on(
    database_url: str,
) -> None:
    """The connection that came back for a call that was cancelled at that moment (its
    timeout) goes to the next waiting call, rather than idling until that one times out."""
    engine = open_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        held = await engine.acquire()
        first = asyncio.create_task(engine.acquire())
        second = asyncio.create_task(engine.acquire())
        await asyncio.sleep(0.05)  # both are waiting
        await engine.release(held)  # wakes the first waiter…
        first.cancel()  # …which is cancelled before it runs
        taken = await asyncio.wait_for(second, 1)
        with pytest.raises(asyncio.CancelledError):
            await first
        await engine.release(taken)
        await assert_all_back(engine, 1)
    finally:
        await engine.close()


async def backend_pid(uow_factory: SqlUnitOfWorkFactory) -> int:
    async with uow_factory() as uow:
        return int(await uow.connection.scalar(select(func.pg_backend_pid())))


async def terminate_others(engine: AsyncEngine) -> int:
    """Close every other session on the test's database, as a PostgreSQL restart would."""
    async with engine.connect() as connection:
        killed = await connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        return int(killed.scalar_one())


@pytest.mark.backends("postgresql")
async def test_dead_pooled_connections_are_replaced_without_failing_the_call(
    small_engine: Engine, engine: AsyncEngine, world: World
) -> None:
    uow_factory = SqlUnitOfWorkFactory(small_engine)
    before = set(await asyncio.gather(*(backend_pid(uow_factory) for _ in range(SIZE))))
    assert await terminate_others(engine) >= 1
    # The next units of work step over the dead connections, reads and writes alike.
    assert await backend_pid(uow_factory) not in before
    await services.save_course(
        uow_factory, slug="after-restart", title="After", price=Decimal("1.00"), currency="USD"
    )
    assert await count_users(uow_factory) == 4
    await assert_all_back(small_engine)


@pytest.mark.backends("postgresql")
async def test_a_connection_lost_mid_unit_of_work_fails_the_call_with_service_unavailable(
    small_engine: Engine, engine: AsyncEngine, world: World
) -> None:
    """Once a unit of work has done something, a lost connection is not retried
    blindly: the call fails (-32000), the connection is dropped, the pool carries on."""
    uow_factory = SqlUnitOfWorkFactory(small_engine)
    with pytest.raises(DBAPIError) as raised:
        async with uow_factory(write=True) as uow:
            await uow.courses.list_all()
            assert await terminate_others(engine) >= 1
            await uow.courses.list_all()
    assert raised.value.connection_invalidated
    assert error_of(raised.value).code == SERVICE_UNAVAILABLE
    assert await count_users(uow_factory) == 4
    await assert_all_back(small_engine)


async def test_a_unit_of_work_makes_only_the_repositories_it_uses_and_its_commit_tells(
    small_engine: Engine, world: World
) -> None:
    factory = SqlUnitOfWorkFactory(small_engine)
    woken: list[str] = []
    factory.after_receipts.append(lambda: woken.append("receipts"))
    factory.after_events.append(lambda: woken.append("events"))
    factory.after_transitions.append(lambda changes: woken.append(f"{len(changes)} changes"))
    async with factory() as uow:
        assert await uow.courses.get_by_slug("python-basics") is not None
        assert uow.courses is uow.courses  # made once
        assert set(vars(uow)) & {"users", "purchases", "receipts", "events"} == set()
    async with factory(write=True) as uow:
        await uow.users.hold(world.alice.actor.user_id)
        await uow.commit()  # neither receipts nor events used: nothing to tell
    assert woken == []
    purchase = await services.create_purchase(
        factory, world.alice.actor, course="python-basics", idempotency_key="lazy-1"
    )
    assert woken == ["events", "1 changes"]  # created: an event, no receipt yet
    woken.clear()
    await pay_and_fulfil(factory, world.alice.actor, purchase)
    assert woken == ["receipts", "events", "1 changes"]
