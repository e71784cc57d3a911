"""What a unit of work costs the database: its statements and nothing else.

On SQLite every trip to aiosqlite's thread is counted (each of ``aiosqlite.Connection``'s
coroutine methods is one): a statement is one trip, a read is one trip, with no BEGIN
and no rollback; a fulfillment is its read, then its four writes and COMMIT (the sqlite3
module opening BEGIN IMMEDIATE with the first write). On
both engines a read runs outside any transaction and a write inside one, and a
connection goes back to the pool without a statement of its own (no rollback after a
read, no reset query), as the statements the driver is given show.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiosqlite
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.db.engines import engine_from_settings, open_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Purchase
from rpc_server.domain.states import PurchaseState
from tests.conftest import FRONTEND_URL, World
from tests.integration.paying import VERIFIER

# aiosqlite.Connection's coroutine methods that a unit of work may use, with SQL or
# without: each call is one trip to the connection's thread. (A new connection's setup,
# one ``executescript``, is the pool's cost, not a unit of work's.)
SQLITE_SQL_METHODS = ("execute", "execute_fetchall", "execute_insert", "executemany")
SQLITE_OTHER_METHODS = ("commit", "rollback", "cursor")


@dataclasses.dataclass(frozen=True)
class Sent:
    """One statement given to a driver, and whether its connection was inside a
    transaction when it was given."""

    sql: str
    in_transaction: bool

    @property
    def word(self) -> str:
        return self.sql.split()[0].upper()


def record_sqlite(monkeypatch: pytest.MonkeyPatch, record: Callable[[Sent], None]) -> None:
    """Record every trip to aiosqlite's threads: the SQL, or the method's name."""
    for name in SQLITE_SQL_METHODS + SQLITE_OTHER_METHODS:
        original = getattr(aiosqlite.Connection, name)

        async def recorded(
            self: aiosqlite.Connection,
            *args: Any,
            _original: Any = original,
            _name: str = name,
            **kwargs: Any,
        ) -> Any:
            sql = args[0] if _name in SQLITE_SQL_METHODS else _name
            record(Sent(sql, self.in_transaction))
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(aiosqlite.Connection, name, recorded)


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts trips to aiosqlite's threads, by kind (a statement's first word, or the
    method: COMMIT for ``commit()``)."""
    counted: Counter[str] = Counter()
    record_sqlite(monkeypatch, lambda sent: counted.update([sent.word]))
    return counted


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Every SQL statement given to a driver (aiosqlite's thread or asyncpg), commits
    and rollbacks included, in order."""
    sent: list[Sent] = []
    record_sqlite(monkeypatch, sent.append)
    for name in ("fetch", "execute"):
        original = getattr(asyncpg.Connection, name)

        async def recorded(self: Any, sql: str, *args: Any, _original: Any = original) -> Any:
            sent.append(Sent(sql, self.is_in_transaction()))
            return await _original(self, sql, *args)

        monkeypatch.setattr(asyncpg.Connection, name, recorded)
    return sent


def words(sent: list[Sent]) -> list[str]:
    return [s.word for s in sent]


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
async def test_a_fulfillment_is_a_read_then_its_writes_in_one_transaction_on_sqlite(
    uow_factory: SqlUnitOfWorkFactory, world: World, purchase: Purchase, statements: list[Sent]
) -> None:
    # The payment backend's call (a payments-scope token: no proof to check).
    await services.fulfill_purchase(
        uow_factory, world.payments.actor, FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
        verifier=VERIFIER,
    )  # fmt: skip
    # The read, outside the transaction (on the shared read connection); then the
    # conditional UPDATE … RETURNING what it changed, given outside a transaction: the
    # sqlite3 module opens BEGIN IMMEDIATE with it, in the same trip; registration;
    # receipt; the audit event, numbered in its own INSERT; COMMIT. One trip each, no
    # BEGIN of its own.
    assert [(s.word, s.in_transaction) for s in statements] == [
        ("SELECT", False),
        ("UPDATE", False),
        ("INSERT", True),
        ("INSERT", True),
        ("INSERT", True),
        ("COMMIT", True),
    ]


@pytest.mark.backends("sqlite")
async def test_a_repeated_fulfillment_is_one_read_on_sqlite(
    uow_factory: SqlUnitOfWorkFactory, world: World, purchase: Purchase, trips: Counter[str]
) -> None:
    async def fulfil() -> None:
        await services.fulfill_purchase(
            uow_factory, world.payments.actor, FrontendLinks(FRONTEND_URL),
            purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
            verifier=VERIFIER,
        )  # fmt: skip

    await fulfil()
    trips.clear()
    await fulfil()  # a repeat: nothing to write, so no transaction
    assert trips == Counter({"SELECT": 1})


@pytest.mark.backends("sqlite")
async def test_a_failed_write_rolls_back_in_one_trip(
    uow_factory: SqlUnitOfWorkFactory, world: World, trips: Counter[str]
) -> None:
    with pytest.raises(NotFound):
        await services.create_purchase(uow_factory, world.alice.actor, course="no-such-course")
    assert trips == Counter({"BEGIN": 1, "SELECT": 1, "ROLLBACK": 1})


async def test_reads_run_outside_transactions_and_writes_inside_one(
    uow_factory: SqlUnitOfWorkFactory, world: World, statements: list[Sent]
) -> None:
    async with uow_factory() as uow:
        await uow.courses.list_all()
    async with uow_factory(write=True) as uow:
        await uow.courses.list_all()
    # The read: one SELECT outside a transaction, and nothing when its connection goes
    # back (no rollback, no reset query). The write: BEGIN, its SELECT inside the
    # transaction, and the rollback of what it did not commit.
    assert [(s.word, s.in_transaction) for s in statements] == [
        ("SELECT", False),
        ("BEGIN", False),
        ("SELECT", True),
        ("ROLLBACK", True),
    ]


@pytest.mark.parametrize("pre_ping", [False, True])
async def test_pre_ping_is_a_setting_for_postgresql_only(
    pre_ping: bool, settings: Settings, world: World, statements: list[Sent]
) -> None:
    """``RPC_SERVER_DB_PRE_PING`` adds a ``SELECT 1`` at each checkout on PostgreSQL;
    on SQLite (a file: nothing goes away) it changes nothing."""
    engine = engine_from_settings(dataclasses.replace(settings, db_pre_ping=pre_ping))
    try:
        actor = await services.authenticate(SqlUnitOfWorkFactory(engine), world.bob.token)
    finally:
        await engine.close()
    assert actor == world.bob.actor
    pinged = pre_ping and engine.dialect_name == "postgresql"
    assert [s.sql for s in statements if s.sql == "SELECT 1"] == (["SELECT 1"] if pinged else [])
    assert words(statements)[int(pinged) :] == ["SELECT"]  # the token's lookup


def test_pre_ping_is_read_from_the_environment() -> None:
    postgres = "postgresql+asyncpg://app@db/shop"
    assert Settings(database_url=postgres).db_pre_ping is False
    pinged = Settings.from_env({"RPC_SERVER_DATABASE_URL": postgres, "RPC_SERVER_DB_PRE_PING": "1"})
    assert pinged.db_pre_ping is True


@pytest.mark.backends("postgresql")
async def test_pre_ping_engine_serves_calls_after_its_connection_died(
    database_url: str, engine: AsyncEngine, world: World
) -> None:
    db_engine = open_engine(database_url, pre_ping=True)
    uow_factory = SqlUnitOfWorkFactory(db_engine)
    try:
        assert await services.authenticate(uow_factory, world.alice.token) == world.alice.actor
        async with engine.connect() as connection:  # the pooled connection is closed
            await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        assert await services.authenticate(uow_factory, world.bob.token) == world.bob.actor
    finally:
        await db_engine.close()


async def test_a_batch_of_gets_reads_one_statement(
    aiohttp_client: Any,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    statements: list[Sent],
) -> None:
    # No receipt deliverer in this app: its polls would be counted among the batch's.
    client = await aiohttp_client(create_app(dataclasses.replace(settings, mail_in_serve=False)))
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
    # The items run in as many lanes as the pool has connections (fewer than 25), but
    # their ids were noted before the batch ran and are read together
    # (rpc_server.db.coalescing): one statement for the batch.
    assert settings.db_pool_size < len(made)
    assert words(statements) == ["SELECT"]
