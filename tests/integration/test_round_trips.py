"""What a unit of work costs the database: its statements and nothing else.

On SQLite every trip to aiosqlite's thread is counted (``OneHopConnection.run`` and its
commit/rollback): a read is one trip, with no BEGIN and no rollback; a fulfillment is
its seven statements (the first one with BEGIN IMMEDIATE, in the same trip) and COMMIT.
On both engines a read runs outside any transaction and a write inside one, as the
statements the driver is given show.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from rpc_server.config import Settings
from rpc_server.database import engine_options
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Purchase
from rpc_server.domain.states import PurchaseState
from rpc_server.sqlite_driver import OneHopConnection
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from tests.conftest import FRONTEND_URL, World
from tests.integration.paying import VERIFIER


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts trips to aiosqlite's threads, by kind (a statement's first word)."""
    counted: Counter[str] = Counter()
    original_execute = OneHopConnection._execute

    async def execute(self: OneHopConnection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # run(fn, conn, sql, params) or run(fn, conn, begin, sql, params)
        words = [arg.split()[0].upper() for arg in args[1:3] if isinstance(arg, str)]
        counted["+".join(words) or getattr(fn, "__name__", "call")] += 1
        return await original_execute(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneHopConnection, "_execute", execute)
    return counted


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first word of every SQL statement given to a driver (aiosqlite's thread or
    asyncpg), commits and rollbacks included, in order."""
    sent: list[str] = []
    original_execute = OneHopConnection._execute

    async def sqlite_execute(self: OneHopConnection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        sql = [arg for arg in args[1:3] if isinstance(arg, str)]
        sent.extend(s.split()[0].upper() for s in sql)
        if not sql and self._in_transaction():
            sent.append(fn.__name__.upper())  # sqlite3's commit() or rollback()
        return await original_execute(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneHopConnection, "_execute", sqlite_execute)
    for name in ("fetch", "execute"):
        original = getattr(asyncpg.Connection, name)

        async def recorded(self: Any, sql: str, *args: Any, _original: Any = original) -> Any:
            sent.append(sql.split()[0].upper())
            return await _original(self, sql, *args)

        monkeypatch.setattr(asyncpg.Connection, name, recorded)
    return sent


@pytest.fixture
async def purchase(uow_factory: SqlUnitOfWorkFactory, world: World) -> Purchase:
    """A pending purchase of alice's (made before the counting starts)."""
    return await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")


@pytest.mark.backends("sqlite")
async def test_a_read_is_one_trip_on_sqlite(
    uow_factory: SqlUnitOfWorkFactory, world: World, purchase: Purchase, trips: Counter[str]
) -> None:
    found = await services.get_purchase(
        uow_factory, world.alice.actor, purchase_id=purchase.purchase_id
    )
    assert found == purchase
    assert trips == Counter({"SELECT": 1})


@pytest.mark.backends("sqlite")
async def test_a_fulfillment_is_its_statements_in_one_transaction_on_sqlite(
    uow_factory: SqlUnitOfWorkFactory, world: World, purchase: Purchase, trips: Counter[str]
) -> None:
    # The payment backend's call (a payments-scope token: no proof to check).
    await services.fulfill_purchase(
        uow_factory, world.payments.actor, FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
        verifier=VERIFIER,
    )  # fmt: skip
    # BEGIN IMMEDIATE with the read; conditional UPDATE; read back; registration;
    # receipt; the audit event's seq (UPDATE event_sequence … RETURNING) and its row;
    # COMMIT. (The last two trips came with the audit trail: one UPDATE and one INSERT
    # more than before.)
    assert trips == Counter({"BEGIN+SELECT": 1, "UPDATE": 2, "SELECT": 1, "INSERT": 3, "commit": 1})


@pytest.mark.backends("sqlite")
async def test_a_failed_write_rolls_back_in_one_trip(
    uow_factory: SqlUnitOfWorkFactory, world: World, trips: Counter[str]
) -> None:
    with pytest.raises(NotFound):
        await services.create_purchase(uow_factory, world.alice.actor, course="no-such-course")
    assert trips == Counter({"BEGIN+SELECT": 1, "rollback": 1})


async def test_reads_run_outside_transactions_and_writes_inside_one(
    uow_factory: SqlUnitOfWorkFactory, world: World, statements: list[str]
) -> None:
    async with uow_factory() as uow:
        await uow.courses.list_all()
        read_in_transaction = in_transaction(uow.connection)
    async with uow_factory(write=True) as uow:
        await uow.courses.list_all()
        write_in_transaction = in_transaction(uow.connection)
    assert (read_in_transaction, write_in_transaction) == (False, True)
    assert statements == ["SELECT", "BEGIN", "SELECT", "ROLLBACK"]


def in_transaction(connection: Any) -> bool:
    """Whether the driver's connection is inside a transaction right now."""
    return bool(connection._driver.in_transaction(connection._driver_connection))


def test_pre_ping_is_a_setting_for_postgresql_only() -> None:
    postgres = "postgresql+asyncpg://app@db/shop"
    assert engine_options(Settings(database_url=postgres))["pool_pre_ping"] is False
    pinged = Settings.from_env({"RPC_SERVER_DATABASE_URL": postgres, "RPC_SERVER_DB_PRE_PING": "1"})
    assert engine_options(pinged)["pool_pre_ping"] is True
    assert "pool_pre_ping" not in engine_options(Settings(database_url="sqlite+aiosqlite:///x"))


@pytest.mark.backends("postgresql")
async def test_pre_ping_engine_serves_calls(database_url: str, world: World) -> None:
    from rpc_server.db.stock_engine import stock_engine

    engine = stock_engine(database_url, pool_pre_ping=True)
    try:
        actor = await services.authenticate(SqlUnitOfWorkFactory(engine), world.bob.token)
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
    assert actor == world.bob.actor


async def test_a_batch_of_gets_reads_one_statement_per_round_of_its_lanes(
    client: Any,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    statements: list[str],
) -> None:
    made = [
        await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
        for _ in range(25)
    ]
    headers = {"Authorization": f"Bearer {world.alice.token}"}
    course_list = {"jsonrpc": "2.0", "method": "course.list", "id": 0}
    await client.post("/rpc", json=course_list, headers=headers)  # the token is now cached
    statements.clear()
    batch = [
        {"jsonrpc": "2.0", "method": "purchase.get", "params": [p.purchase_id], "id": n}
        for n, p in enumerate(made)
    ]
    answers = await (await client.post("/rpc", json=batch, headers=headers)).json()
    assert [a["result"]["purchase_id"] for a in answers] == [p.purchase_id for p in made]
    # The items run in as many lanes as the pool has connections; the lookups of one
    # round of lanes are read together (rpc_server.coalescing).
    rounds = -(-len(made) // settings.db_pool_size)
    assert (rounds, statements) == (3, ["SELECT"] * rounds)
