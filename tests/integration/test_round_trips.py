"""What a unit of work costs the database: its statements and nothing else.

On SQLite every trip to aiosqlite's thread is counted (``OneHopConnection.run`` and its
commit/rollback): a read is one trip, with no BEGIN and no rollback; a fulfillment is
BEGIN IMMEDIATE, its five statements and COMMIT. On PostgreSQL a read runs outside any
transaction (autocommit) and a write inside one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.database import engine_options
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Purchase
from rpc_server.domain.states import PurchaseState
from rpc_server.sqlite_driver import OneHopConnection
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from tests.conftest import FRONTEND_URL, World


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts trips to aiosqlite's threads, by kind (a statement's first word)."""
    counted: Counter[str] = Counter()
    original_execute = OneHopConnection._execute

    async def execute(self: OneHopConnection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) >= 2 and isinstance(args[1], str):  # run(_run, conn, sql, params)
            counted[args[1].split()[0].upper()] += 1
        else:
            counted[getattr(fn, "__name__", "call")] += 1
        return await original_execute(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneHopConnection, "_execute", execute)
    return counted


@pytest.fixture
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement SQLAlchemy sends, as sent."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.split()[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine.sync_engine, "before_cursor_execute", record)


@pytest.fixture
async def purchase(uow_factory: SqlAlchemyUnitOfWorkFactory, world: World) -> Purchase:
    """A pending purchase of alice's (made before the counting starts)."""
    return await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")


@pytest.mark.backends("sqlite")
async def test_a_read_is_one_trip_on_sqlite(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World, purchase: Purchase, trips: Counter[str]
) -> None:
    found = await services.get_purchase(
        uow_factory, world.alice.actor, purchase_id=purchase.purchase_id
    )
    assert found == purchase
    assert trips == Counter({"SELECT": 1})


@pytest.mark.backends("sqlite")
async def test_a_fulfillment_is_its_statements_in_one_transaction_on_sqlite(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World, purchase: Purchase, trips: Counter[str]
) -> None:
    await services.fulfill_purchase(
        uow_factory, world.alice.actor, FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
    )  # fmt: skip
    # BEGIN IMMEDIATE; read; conditional UPDATE; read back; registration; receipt; COMMIT.
    assert trips == Counter({"BEGIN": 1, "SELECT": 2, "UPDATE": 1, "INSERT": 2, "commit": 1})


@pytest.mark.backends("sqlite")
async def test_a_failed_write_rolls_back_in_one_trip(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World, trips: Counter[str]
) -> None:
    with pytest.raises(NotFound):
        await services.create_purchase(uow_factory, world.alice.actor, course="no-such-course")
    assert trips == Counter({"BEGIN": 1, "SELECT": 1, "rollback": 1})


async def test_reads_run_outside_transactions_and_writes_inside_one(
    uow_factory: SqlAlchemyUnitOfWorkFactory, world: World, statements: list[str]
) -> None:
    async with uow_factory() as uow:
        await uow.courses.list_all()
        read_in_transaction = await in_transaction(uow.connection)
    async with uow_factory(write=True) as uow:
        await uow.courses.list_all()
        write_in_transaction = await in_transaction(uow.connection)
    assert (read_in_transaction, write_in_transaction) == (False, True)
    # SQLite gets its BEGIN as a statement; PostgreSQL's comes from asyncpg itself.
    expected_begin = ["BEGIN"] if uow_factory.engine.dialect.name == "sqlite" else []
    assert statements == ["SELECT", *expected_begin, "SELECT"]


async def in_transaction(connection: Any) -> bool:
    """Whether the driver's connection is inside a transaction right now."""
    raw = await connection._connection.get_raw_connection()
    driver = raw.driver_connection
    if isinstance(driver, OneHopConnection):
        return bool(driver._conn.in_transaction)
    return bool(driver.is_in_transaction())


def test_pre_ping_is_a_setting_for_postgresql_only() -> None:
    postgres = "postgresql+asyncpg://app@db/shop"
    assert engine_options(Settings(database_url=postgres))["pool_pre_ping"] is False
    pinged = Settings.from_env({"RPC_SERVER_DATABASE_URL": postgres, "RPC_SERVER_DB_PRE_PING": "1"})
    assert engine_options(pinged)["pool_pre_ping"] is True
    assert "pool_pre_ping" not in engine_options(Settings(database_url="sqlite+aiosqlite:///x"))


@pytest.mark.backends("postgresql")
async def test_pre_ping_engine_serves_calls(database_url: str, world: World) -> None:
    from rpc_server.database import create_engine

    engine = create_engine(database_url, pool_pre_ping=True)
    try:
        actor = await services.authenticate(SqlAlchemyUnitOfWorkFactory(engine), world.bob.token)
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
    assert actor == world.bob.actor
