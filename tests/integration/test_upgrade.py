"""Upgrading a database made by the previous release to this one, the way users do.

The previous release's schema is revision 0003. Its database is filled with raw SQL as
that release wrote it (values bound with the column types its models had): a staff user
and a buyer, their tokens (live, expired, revoked), courses, purchases in every state
with idempotency keys and an error message, the registrations and receipts of the
fulfilled ones (one receipt sent, one pending under an expired claim, one dead) and a
rate-limit bucket. Then ``rpc-server migrate`` runs as a separate process, as an
operator runs it.

Checked: every row is still there with the same values; tokens of staff users got the
staff scope and all others the buyer scope; each purchase got exactly one audit event
(from nothing to its state, source ``migration``, ``seq`` its row id) and the event
sequence continues after the largest; the outbox's statuses read back as ``OutboxStatus``
through the port and its CHECK still refuses any other; and the upgraded database works: old tokens
authenticate over HTTP (and expired and revoked ones still do not), old registrations
and idempotency keys count, new changes get the next seqs, and the pending receipt is
delivered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, DateTime, Float, Integer, Numeric, bindparam, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.db.engines import open_engine
from rpc_server.db.migrate import alembic_config, migrate
from rpc_server.db.stock_engine import stock_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.outbox import OutboxStatus
from rpc_server.domain.tokens import hash_token, new_token
from tests import databases
from tests.conftest import FRONTEND_URL, POSTGRES_ADMIN_URL, sqlite_url
from tests.integration.smtp_server import eventually
from tests.payments import TEST_PAYMENT_KEY, proof_for
from tests.processes import RPC_SERVER

PREVIOUS_RELEASE = "0003"
# The tables of the previous release and their keys (rows are compared in key order).
TABLES = {
    "users": "id",
    "api_tokens": "id",
    "courses": "id",
    "purchases": "id",
    "course_registrations": "id",
    "receipt_outbox": "id",
    "rate_limit_buckets": "key",
}
# The column types of the previous release's models, for binding values as it did.
TYPES = {
    "is_staff": Boolean(),
    "price": Numeric(12, 2),
    "amount": Numeric(12, 2),
    "attempts": Integer(),
    "tokens": Float(),
    "last_granted": Integer(),
    **{
        name: DateTime(timezone=True)
        for name in (
            "created_at", "updated_at", "fulfilled_at", "expires_at", "revoked_at",
            "next_attempt_at", "sent_at",
        )
    },
}  # fmt: skip
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def empty_database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database without any schema (the shared ``database_url`` is migrated to head)."""
    if backend == "sqlite":
        yield sqlite_url(tmp_path / "previous-release.sqlite3")
        return
    assert POSTGRES_ADMIN_URL is not None
    url = asyncio.run(databases.create_empty(POSTGRES_ADMIN_URL))
    yield url
    asyncio.run(databases.drop(POSTGRES_ADMIN_URL, make_url(url).database or ""))


async def insert(connection: AsyncConnection, table: str, **values: Any) -> int:
    """INSERT one row as the previous release did; return its id."""
    names = list(values)
    statement = text(
        f"INSERT INTO {table} ({', '.join(names)}) "
        f"VALUES ({', '.join(':' + name for name in names)}) RETURNING id"
    ).bindparams(*(bindparam(name, type_=TYPES[name]) for name in names if name in TYPES))
    return int((await connection.execute(statement, values)).scalar_one())


@dataclass(frozen=True)
class OldPurchase:
    pk: int
    purchase_id: str
    owner: str  # "buyer" or "staff"
    course: str
    amount: str
    currency: str
    state: str
    error_msg: str | None
    idempotency_key: str | None


@dataclass(frozen=True)
class PreviousRelease:
    """What the previous release's database holds (besides the rows themselves)."""

    staff_tokens: dict[str, str]  # live, revoked
    buyer_tokens: dict[str, str]  # live, expired, revoked
    user_ids: dict[str, int]  # staff, buyer
    purchases: dict[int, OldPurchase]  # by row id
    pending_receipt_of: int  # the purchase whose receipt waits, under an expired claim


async def fill_previous_release(engine: AsyncEngine) -> PreviousRelease:
    async with engine.begin() as c:
        users = {
            "staff": await insert(
                c, "users", email="support@old.example", is_staff=True, created_at=at(0)
            ),
            "buyer": await insert(
                c, "users", email="buyer@old.example", is_staff=False, created_at=at(1)
            ),
        }
        staff_tokens = {"live": new_token(), "revoked": new_token()}
        buyer_tokens = {"live": new_token(), "expired": new_token(), "revoked": new_token()}
        for owner, tokens in (("staff", staff_tokens), ("buyer", buyer_tokens)):
            for kind, token in tokens.items():
                await insert(
                    c, "api_tokens", user_id=users[owner], token_hash=hash_token(token),
                    created_at=at(2),
                    expires_at=at(60 * 24) if kind == "expired" else None,
                    revoked_at=at(60) if kind == "revoked" else None,
                )  # fmt: skip
        courses = {
            slug: (
                await insert(c, "courses", slug=slug, title=title, price=price, currency=cur),
                price,
                cur,
            )
            for slug, title, price, cur in (
                ("python-basics", "Python Basics", Decimal("49.00"), "USD"),
                ("sql-fundamentals", "SQL Fundamentals", Decimal("39.50"), "EUR"),
                ("rust-intro", "Rust Intro", Decimal("120.00"), "EUR"),
            )
        }
        # Row ids with gaps (as a PostgreSQL sequence leaves after rolled-back inserts):
        # the backfilled seq is the row id, not a row number.
        plan = [
            (101, "buyer", "python-basics", "pending", None, "checkout-101"),
            (102, "buyer", "python-basics", "failed", "card declined", "checkout-102"),
            (105, "buyer", "python-basics", "fulfilled", None, "checkout-105"),
            (106, "buyer", "sql-fundamentals", "fulfilled", None, "checkout-106"),
            (110, "staff", "rust-intro", "fulfilled", None, "support-110"),
            (111, "buyer", "sql-fundamentals", "canceled", None, None),
        ]
        purchases: dict[int, OldPurchase] = {}
        for n, (pk, owner, slug, state, error_msg, key) in enumerate(plan):
            course_pk, price, currency = courses[slug]
            purchase_id = f"{pk:032x}"
            fulfilled = state == "fulfilled"
            await insert(
                c, "purchases", id=pk, purchase_id=purchase_id, owner_id=users[owner],
                course_id=course_pk, amount=price, currency=currency, state=state,
                error_msg=error_msg, idempotency_key=key, created_at=at(10 + n),
                updated_at=at(20 + n), fulfilled_at=at(20 + n) if fulfilled else None,
            )  # fmt: skip
            purchases[pk] = OldPurchase(
                pk, purchase_id, owner, slug, f"{price}", currency, state, error_msg, key
            )
            if fulfilled:
                await insert(
                    c, "course_registrations", purchase_id=pk, user_id=users[owner],
                    course_id=course_pk, created_at=at(20 + n),
                )  # fmt: skip
        recipients = {"buyer": "buyer@old.example", "staff": "support@old.example"}
        for pk, status, attempts, error, claim, sent in (
            (105, "sent", 1, None, None, at(21)),
            # Claimed by a deliverer that died: its lease ran out long ago.
            (106, "pending", 2, "SMTP server unreachable: [Errno 111]", "c1a1m", None),
            (110, "dead", 8, "recipient refused: 550 5.1.1 no such user", None, None),
        ):
            await insert(
                c, "receipt_outbox", purchase_id=pk, recipient=recipients[purchases[pk].owner],
                status=status, attempts=attempts, next_attempt_at=at(30), last_error=error,
                claim_token=claim, created_at=at(20), sent_at=sent,
            )  # fmt: skip
        await c.execute(
            text(
                "INSERT INTO rate_limit_buckets (key, tokens, updated_at, last_granted) "
                "VALUES (:key, :tokens, :updated_at, :last_granted)"
            ).bindparams(*(bindparam(n, type_=TYPES[n]) for n in ("tokens", "updated_at"))),
            {
                "key": hash_token(buyer_tokens["live"])[:32],
                "tokens": 487.5,
                "updated_at": at(40),
                "last_granted": 3,
            },
        )
        if engine.dialect.name == "postgresql":
            # Ids were given explicitly: move the sequence past them, as it would be.
            await c.execute(text("SELECT setval(pg_get_serial_sequence('purchases', 'id'), 111)"))
    return PreviousRelease(staff_tokens, buyer_tokens, users, purchases, pending_receipt_of=106)


async def snapshot(engine: AsyncEngine) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every row of the previous release's tables, as the driver reads them."""
    tables = {}
    async with engine.connect() as connection:
        for table, key in TABLES.items():
            result = await connection.execute(text(f"SELECT * FROM {table} ORDER BY {key}"))
            tables[table] = (list(result.keys()), [tuple(row) for row in result])
    return tables


async def rows(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(text(sql))]


def rpc_server_migrate(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RPC_SERVER, "migrate"],
        env={**os.environ, "RPC_SERVER_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_database_of_the_previous_release_upgrades_intact_and_works(
    empty_database_url: str,
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    url = empty_database_url
    await migrate(url, PREVIOUS_RELEASE)
    engine = stock_engine(url, poolclass=NullPool)
    try:
        old = await fill_previous_release(engine)
        before = await snapshot(engine)

        upgraded = await asyncio.to_thread(rpc_server_migrate, url)
        assert upgraded.returncode == 0, upgraded.stderr
        assert "database schema is up to date" in upgraded.stdout

        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert await rows(engine, "SELECT version_num FROM alembic_version") == [(head,)]
        await assert_upgraded_intact(engine, old, before)
        await assert_outbox_statuses_hold(engine, old, url)
        await assert_upgraded_database_works(engine, old, url, tmp_path, aiohttp_client)
    finally:
        await engine.dispose()


async def assert_upgraded_intact(
    engine: AsyncEngine,
    old: PreviousRelease,
    before: dict[str, tuple[list[str], list[tuple[Any, ...]]]],
) -> None:
    # Every row, every value, as it was (the new columns aside).
    for table, (columns, old_rows) in before.items():
        now = await rows(
            engine, f"SELECT {', '.join(columns)} FROM {table} ORDER BY {TABLES[table]}"
        )
        assert now == old_rows, table
    assert [len(before[t][1]) for t in TABLES] == [2, 5, 3, 6, 3, 3, 1]

    # Tokens of staff users are staff tokens; all others buyer tokens.
    scopes = await rows(
        engine,
        "SELECT u.email, t.scope, count(*) FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "GROUP BY u.email, t.scope ORDER BY u.email",
    )
    assert scopes == [("buyer@old.example", "buyer", 3), ("support@old.example", "staff", 2)]
    assert await rows(engine, "SELECT count(*) FROM purchases WHERE payment_ref IS NULL") == [(6,)]

    # One event per purchase: its history begins in the state it was in, seq its row id.
    events = await rows(
        engine,
        "SELECT seq, purchase_id, from_state, to_state, actor_user_id, actor_scope, source, "
        "evidence, payment_event_id, payment_ref, error_msg FROM purchase_events ORDER BY seq",
    )
    assert events == [
        (p.pk, p.pk, None, p.state, None, None, "migration", None, None, None, p.error_msg)
        for p in sorted(old.purchases.values(), key=lambda p: p.pk)
    ]
    # Each at the time of the purchase's last change.
    same_time = await rows(
        engine,
        "SELECT count(*) FROM purchase_events e JOIN purchases p ON p.id = e.purchase_id "
        "WHERE e.created_at = p.updated_at",
    )
    assert same_time == [(6,)]
    assert await rows(engine, "SELECT id, last_seq FROM event_sequence") == [
        (1, max(old.purchases))
    ]


async def assert_outbox_statuses_hold(engine: AsyncEngine, old: PreviousRelease, url: str) -> None:
    """The old rows' statuses are ``OutboxStatus`` values to the port (``mail-status``),
    and the CHECK constraint on them came through every migration."""
    db_engine = open_engine(url)
    try:
        overview = await services.outbox_overview(SqlUnitOfWorkFactory(db_engine), limit=10)
    finally:
        await db_engine.close()
    assert dict(overview.counts) == {
        OutboxStatus.PENDING: 1, OutboxStatus.SENT: 1, OutboxStatus.DEAD: 1
    }  # fmt: skip
    assert {(e.purchase_id, e.status, e.attempts) for e in overview.entries} == {
        (old.purchases[105].purchase_id, OutboxStatus.SENT, 1),
        (old.purchases[106].purchase_id, OutboxStatus.PENDING, 2),
        (old.purchases[110].purchase_id, OutboxStatus.DEAD, 8),
    }
    with pytest.raises(IntegrityError, match="ck_receipt_outbox_status_known"):
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE receipt_outbox SET status = 'bounced'"))


async def assert_upgraded_database_works(
    engine: AsyncEngine,
    old: PreviousRelease,
    url: str,
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    settings = Settings(
        database_url=url,
        frontend_url=FRONTEND_URL,
        mail_dir=str(tmp_path / "mail"),
        mail_poll_interval=0.1,
        rate_limit=0,
        payment_keys=(TEST_PAYMENT_KEY,),
    )
    client = await aiohttp_client(create_app(settings))
    calls = iter(range(1, 1000))

    async def rpc(method: str, params: Any, token: str) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "params": params, "id": next(calls)}
        response = await client.post(
            "/rpc", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 200, await response.text()
        return await response.json()

    buyer, staff = old.buyer_tokens["live"], old.staff_tokens["live"]
    by_owner = {
        owner: {p.purchase_id: p for p in old.purchases.values() if p.owner == owner}
        for owner in ("buyer", "staff")
    }

    # Old tokens authenticate, with the scope of their user's role.
    mine = (await rpc("purchase.list", {"limit": 100}, buyer))["result"]["items"]
    assert {
        p["purchase_id"]: (p["course"], p["amount"], p["currency"], p["state"], p["error_msg"])
        for p in mine
    } == {
        p.purchase_id: (p.course, p.amount, p.currency, p.state, p.error_msg)
        for p in by_owner["buyer"].values()
    }
    everyone = (await rpc("purchase.list", {"limit": 100}, staff))["result"]["items"]
    assert {p["purchase_id"] for p in everyone} == {p.purchase_id for p in old.purchases.values()}
    for dead in (*old.staff_tokens.values(), *old.buyer_tokens.values()):
        if dead in (buyer, staff):
            continue
        answer = await rpc("purchase.list", {"limit": 100}, dead)
        assert answer["error"]["code"] == 401, answer

    # A purchase's history starts with its migration event.
    failed = old.purchases[102]
    [event] = (await rpc("purchase.events", [failed.purchase_id], buyer))["result"]
    assert (event["seq"], event["from_state"], event["to_state"], event["source"]) == (
        102, None, "failed", "migration"
    )  # fmt: skip
    assert (event["error_msg"], event["actor_scope"], event["evidence"]) == (
        "card declined", None, None
    )  # fmt: skip

    # Old registrations count: the buyer has python and sql, and cannot buy them again;
    # an old idempotency key still replays its purchase.
    registrations = (await rpc("registration.list", {}, buyer))["result"]
    assert {r["purchase_id"] for r in registrations} == {
        old.purchases[105].purchase_id, old.purchases[106].purchase_id
    }  # fmt: skip
    again = await rpc("purchase.create", {"course": "python-basics"}, buyer)
    assert again["error"]["code"] == 409, again
    assert again["error"]["data"] == {"course": "python-basics"}
    replayed = await rpc(
        "purchase.create", {"course": "python-basics", "idempotency_key": "checkout-101"}, buyer
    )
    assert replayed["result"]["purchase_id"] == old.purchases[101].purchase_id

    # New changes: the sequence continues after every backfilled seq, without a gap.
    backfilled = max(old.purchases)
    created = (
        await rpc("purchase.create", {"course": "rust-intro", "idempotency_key": "new"}, buyer)
    )["result"]
    paid = {
        "purchase_id": created["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(created),
    }
    assert (await rpc("purchase.fulfill", paid, buyer))["result"]["purchase"]["state"] == (
        "fulfilled"
    )
    old_pending = old.purchases[101]
    pay_old = {
        "purchase_id": old_pending.purchase_id,
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(
            {"purchase_id": old_pending.purchase_id, "amount": "49.00", "currency": "USD"}
        ),
    }
    assert (await rpc("purchase.fulfill", pay_old, buyer))["result"]["purchase"]["state"] == (
        "fulfilled"
    )
    new_history = (await rpc("purchase.events", [created["purchase_id"]], staff))["result"]
    assert [(e["seq"], e["to_state"], e["source"]) for e in new_history] == [
        (backfilled + 1, "pending", "rpc"),
        (backfilled + 2, "fulfilled", "rpc"),
    ]
    assert new_history[1]["evidence"] == "payment_event"
    old_history = (await rpc("purchase.events", [old_pending.purchase_id], buyer))["result"]
    assert [(e["seq"], e["from_state"], e["to_state"]) for e in old_history] == [
        (101, None, "pending"),
        (backfilled + 3, "pending", "fulfilled"),
    ]
    assert await rpc_last_seq(engine) == backfilled + 3

    # The receipt left pending under a dead deliverer's claim goes out now.
    pending_pk = old.pending_receipt_of

    async def sent() -> bool:
        status = await rows(
            engine, f"SELECT status FROM receipt_outbox WHERE purchase_id = {pending_pk}"
        )
        return status == [("sent",)]

    await eventually(sent, within=10.0, what="the old pending receipt to be sent")
    dead = await rows(engine, "SELECT status, attempts FROM receipt_outbox WHERE purchase_id = 110")
    assert dead == [("dead", 8)]


async def rpc_last_seq(engine: AsyncEngine) -> int:
    [(last_seq,)] = await rows(engine, "SELECT last_seq FROM event_sequence")
    return int(last_seq)
