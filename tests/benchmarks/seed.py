"""The benchmark database: a fresh SQLite file or PostgreSQL database per run, seeded.

Users and their tokens come from the project's own ``services.issue_token`` and courses
from ``services.save_course``; purchases are generated inside the database (a recursive
CTE on SQLite, ``INSERT … SELECT generate_series`` on PostgreSQL), so a million rows take
seconds. Pending purchases for the fulfill workloads are inserted with ids chosen here,
so the load generator can fulfill each one once: a pool of them at seeding time
(``Sizes.pending_pool``, at least 41,000: the issue's data), topped up between
measurements when a plan needs more than the pool holds; so are fresh courses for the
workloads that create purchases (a user registered for a course cannot buy it again).
The purchases inserted here have no audit events (the servers under test never read
them). Fulfilling is the payment backend's call: a payments-scope token
(``payments_user``), which needs no proof of payment.

``OutboxCounts`` reads the receipt outbox: how many of the project's receipts are still
to send, and how many were sent (the baselines queue theirs due in 2100, never sent).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol

import asyncpg
from sqlalchemy.engine import make_url

from rpc_server.db.engines import open_engine
from rpc_server.db.migrate import migrate
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.records import Course
from rpc_server.domain.states import Scope
from tests import databases


@dataclass(frozen=True)
class BenchUser:
    email: str
    token: str
    user_id: int

    @property
    def authorization(self) -> str:
        return f"Bearer {self.token}"


@dataclass(frozen=True)
class Sizes:
    # The caller of purchase.get and its batches.
    get_user: int = 10_000
    list_small: int = 10_000
    list_big: int = 1_000_000
    # Purchases of other users made after the big user's: a heavy account's history is
    # mostly old, so its newest page is not at the end of the table.
    newer_by_others: int = 50_000
    mixed_users: int = 7
    mixed_user_purchases: int = 300
    # Pending purchases of the fulfill user, each fulfilled once by a plan.
    pending_pool: int = 41_000


@dataclass
class Dataset:
    engine: str
    url: str
    sizes: Sizes
    courses: list[Course]
    get_user: BenchUser
    get_ids: list[str]
    list_users: dict[str, BenchUser]  # "small", "big"
    deep_cursors: dict[str, list[int]]  # row ids to continue before, mid-history
    fulfill_user: BenchUser  # owns the fresh purchases of the fulfill workload
    payments_user: BenchUser  # the payment backend: fulfils them (payments scope)
    mixed_users: list[BenchUser]
    mixed_ids: dict[int, list[str]]  # user_id -> some of their purchase ids
    bulk: Bulk
    seconds: dict[str, float] = field(default_factory=dict)
    # Ids of pending purchases of fulfill_user no plan has used yet (take_pending).
    pending_pool: list[str] = field(default_factory=list)
    # Pending purchases inserted after seeding, when the pool ran short.
    topped_up: int = 0


class Bulk(Protocol):
    """Raw, fast writes and reads of purchases, beside the servers (between measurements)."""

    async def insert_history(
        self, owner_id: int, count: int, courses: Sequence[Course]
    ) -> None: ...

    async def insert_pending(self, owner_id: int, ids: Sequence[str], course: Course) -> None: ...

    async def insert_courses(self, slugs: Sequence[str]) -> None: ...

    async def id_range(self, owner_id: int) -> tuple[int, int]: ...

    async def purchase_ids(self, owner_id: int, limit: int) -> list[str]: ...

    async def analyze(self) -> None: ...

    async def outbox(self) -> OutboxCounts: ...

    async def park_outbox(self) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class OutboxCounts:
    """The project's receipts: still to send (pending, claimed or not) and sent."""

    backlog: int
    sent: int


# Receipts due before this are the project's; the baselines' are due in 2100.
_PROJECT_RECEIPTS_BEFORE = datetime(2099, 1, 1, tzinfo=UTC)
_PARKED_UNTIL = datetime(2100, 1, 1, tzinfo=UTC)
_OUTBOX_SQL = (
    "SELECT (SELECT count(*) FROM receipt_outbox WHERE status = 'pending' "
    "AND next_attempt_at < {before}), "
    "(SELECT count(*) FROM receipt_outbox WHERE status = 'sent')"
)
# Pending receipts of a run without the deliverer, put off like the baselines'.
_PARK_SQL = (
    "UPDATE receipt_outbox SET next_attempt_at = {until} "
    "WHERE status = 'pending' AND next_attempt_at < {before}"
)


def _sqlite_time(moment: datetime) -> str:
    return moment.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


# The history's state mix: 70% fulfilled, 10% failed, 10% canceled, 10% pending.
_SQLITE_HISTORY = """
WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :count)
INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, state, error_msg,
                       created_at, updated_at, fulfilled_at)
SELECT lower(hex(randomblob(16))), :owner,
       CASE WHEN i % 2 = 0 THEN :course_a ELSE :course_b END,
       CASE WHEN i % 2 = 0 THEN :amount_a ELSE :amount_b END,
       CASE WHEN i % 2 = 0 THEN :currency_a ELSE :currency_b END,
       CASE WHEN i % 10 < 7 THEN 'fulfilled' WHEN i % 10 = 7 THEN 'failed'
            WHEN i % 10 = 8 THEN 'canceled' ELSE 'pending' END,
       CASE WHEN i % 10 = 7 THEN 'card declined' END,
       :now, :now, CASE WHEN i % 10 < 7 THEN :now END
FROM seq
"""

_POSTGRES_HISTORY = """
INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, state, error_msg,
                       created_at, updated_at, fulfilled_at)
SELECT md5(random()::text || clock_timestamp()::text || i::text), $1::bigint,
       CASE WHEN i % 2 = 0 THEN $2::bigint ELSE $3::bigint END,
       CASE WHEN i % 2 = 0 THEN $4::numeric ELSE $5::numeric END,
       CASE WHEN i % 2 = 0 THEN $6::varchar ELSE $7::varchar END,
       CASE WHEN i % 10 < 7 THEN 'fulfilled' WHEN i % 10 = 7 THEN 'failed'
            WHEN i % 10 = 8 THEN 'canceled' ELSE 'pending' END,
       CASE WHEN i % 10 = 7 THEN 'card declined' END,
       $8::timestamptz, $8::timestamptz, CASE WHEN i % 10 < 7 THEN $8::timestamptz END
FROM generate_series(1, $9::integer) AS i
"""

# Fresh courses: what nobody is registered for yet.
_FRESH_COURSE_PRICE = Decimal("19.00")
_FRESH_COURSE_CURRENCY = "USD"
_COURSE_COLUMNS = ("slug", "title", "price", "currency")

PENDING_COLUMNS = (
    "purchase_id",
    "owner_id",
    "course_id",
    "amount",
    "currency",
    "state",
    "created_at",
    "updated_at",
)


class SqliteBulk:
    def __init__(self, path: str):
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA busy_timeout=30000")

    async def insert_history(self, owner_id: int, count: int, courses: Sequence[Course]) -> None:
        a, b = courses[0], courses[-1]
        now = _sqlite_time(datetime.now(UTC))
        with self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            self.connection.execute(
                _SQLITE_HISTORY,
                {
                    "count": count,
                    "owner": owner_id,
                    "course_a": a.pk,
                    "course_b": b.pk,
                    "amount_a": float(a.price),
                    "amount_b": float(b.price),
                    "currency_a": a.currency,
                    "currency_b": b.currency,
                    "now": now,
                },
            )

    async def insert_pending(self, owner_id: int, ids: Sequence[str], course: Course) -> None:
        now = _sqlite_time(datetime.now(UTC))
        rows = [
            (pid, owner_id, course.pk, float(course.price), course.currency, "pending", now, now)
            for pid in ids
        ]
        marks = ", ".join("?" * len(PENDING_COLUMNS))
        with self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            self.connection.executemany(
                f"INSERT INTO purchases ({', '.join(PENDING_COLUMNS)}) VALUES ({marks})", rows
            )

    async def insert_courses(self, slugs: Sequence[str]) -> None:
        price = float(_FRESH_COURSE_PRICE)
        rows = [(slug, slug, price, _FRESH_COURSE_CURRENCY) for slug in slugs]
        with self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            self.connection.executemany(
                f"INSERT INTO courses ({', '.join(_COURSE_COLUMNS)}) VALUES (?, ?, ?, ?)", rows
            )

    async def id_range(self, owner_id: int) -> tuple[int, int]:
        low, high = self.connection.execute(
            "SELECT min(id), max(id) FROM purchases WHERE owner_id = ?", (owner_id,)
        ).fetchone()
        return int(low), int(high)

    async def purchase_ids(self, owner_id: int, limit: int) -> list[str]:
        rows = self.connection.execute(
            "SELECT purchase_id FROM purchases WHERE owner_id = ? ORDER BY id LIMIT ?",
            (owner_id, limit),
        ).fetchall()
        return [row[0] for row in rows]

    async def analyze(self) -> None:
        # The project's database never runs ANALYZE: keep the planner's view the same.
        self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def outbox(self) -> OutboxCounts:
        backlog, sent = self.connection.execute(
            _OUTBOX_SQL.format(before="?"), (_sqlite_time(_PROJECT_RECEIPTS_BEFORE),)
        ).fetchone()
        return OutboxCounts(int(backlog), int(sent))

    async def park_outbox(self) -> int:
        with self.connection:
            self.connection.execute("BEGIN IMMEDIATE")
            cursor = self.connection.execute(
                _PARK_SQL.format(until="?", before="?"),
                (_sqlite_time(_PARKED_UNTIL), _sqlite_time(_PROJECT_RECEIPTS_BEFORE)),
            )
        return int(cursor.rowcount)

    async def close(self) -> None:
        self.connection.close()


class PostgresBulk:
    def __init__(self, connection: asyncpg.Connection):
        self.connection = connection

    @classmethod
    async def open(cls, url: str) -> PostgresBulk:
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(await asyncpg.connect(dsn))

    async def insert_history(self, owner_id: int, count: int, courses: Sequence[Course]) -> None:
        a, b = courses[0], courses[-1]
        await self.connection.execute(
            _POSTGRES_HISTORY,
            owner_id,
            a.pk,
            b.pk,
            a.price,
            b.price,
            a.currency,
            b.currency,
            datetime.now(UTC),
            count,
        )

    async def insert_pending(self, owner_id: int, ids: Sequence[str], course: Course) -> None:
        now = datetime.now(UTC)
        await self.connection.copy_records_to_table(
            "purchases",
            records=[
                (pid, owner_id, course.pk, course.price, course.currency, "pending", now, now)
                for pid in ids
            ],
            columns=list(PENDING_COLUMNS),
        )

    async def insert_courses(self, slugs: Sequence[str]) -> None:
        await self.connection.copy_records_to_table(
            "courses",
            records=[(slug, slug, _FRESH_COURSE_PRICE, _FRESH_COURSE_CURRENCY) for slug in slugs],
            columns=list(_COURSE_COLUMNS),
        )

    async def id_range(self, owner_id: int) -> tuple[int, int]:
        row = await self.connection.fetchrow(
            "SELECT min(id), max(id) FROM purchases WHERE owner_id = $1", owner_id
        )
        assert row is not None
        return int(row[0]), int(row[1])

    async def purchase_ids(self, owner_id: int, limit: int) -> list[str]:
        rows = await self.connection.fetch(
            "SELECT purchase_id FROM purchases WHERE owner_id = $1 ORDER BY id LIMIT $2",
            owner_id,
            limit,
        )
        return [row[0] for row in rows]

    async def analyze(self) -> None:
        # Autovacuum would analyze the new rows at some point mid-run; do it up front so
        # every round sees the same plans.
        await self.connection.execute("VACUUM ANALYZE")

    async def outbox(self) -> OutboxCounts:
        row = await self.connection.fetchrow(
            _OUTBOX_SQL.format(before="$1"), _PROJECT_RECEIPTS_BEFORE
        )
        assert row is not None
        return OutboxCounts(int(row[0]), int(row[1]))

    async def park_outbox(self) -> int:
        status = await self.connection.execute(
            _PARK_SQL.format(until="$1", before="$2"), _PARKED_UNTIL, _PROJECT_RECEIPTS_BEFORE
        )
        return int(status.split()[-1])

    async def close(self) -> None:
        await self.connection.close()


async def create_database(engine: str, workdir: Path, admin_url: str | None) -> str:
    """Create an empty, migrated database; return its SQLAlchemy URL."""
    if engine == "sqlite":
        url = f"sqlite+aiosqlite:///{workdir / 'bench.sqlite3'}"
    else:
        assert admin_url is not None
        name = f"rpc_bench_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(
            make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        url = databases.with_database(admin_url, name)
    await migrate(url)
    return url


async def drop_database(url: str, admin_url: str | None) -> None:
    if make_url(url).get_backend_name() == "sqlite" or admin_url is None:
        return
    connection = await asyncpg.connect(
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        name = make_url(url).database
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def seed(engine: str, url: str, sizes: Sizes, rng: random.Random) -> Dataset:
    """Users with tokens, two courses, and the purchases every workload needs."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    db_engine = open_engine(url)
    try:
        uow = SqlUnitOfWorkFactory(db_engine)

        async def user(email: str, scope: Scope = Scope.BUYER) -> BenchUser:
            token = await services.issue_token(uow, email, scope=scope)
            actor = await services.authenticate(uow, token)
            assert actor is not None
            return BenchUser(email, token, actor.user_id)

        courses = [
            await services.save_course(
                uow,
                slug="python-basics",
                title="Python Basics",
                price=Decimal("49.00"),
                currency="USD",
            ),
            await services.save_course(
                uow,
                slug="sql-fundamentals",
                title="SQL Fundamentals",
                price=Decimal("39.50"),
                currency="EUR",
            ),
        ]
        get_user = await user("get@bench.example")
        small = await user("list-10k@bench.example")
        big = await user("list-big@bench.example")
        fulfill_user = await user("fulfill@bench.example")
        payments_user = await user("payments@bench.example", Scope.PAYMENTS)
        crowd = await user("crowd@bench.example")
        mixed_users = [await user(f"mixed{i}@bench.example") for i in range(sizes.mixed_users)]
    finally:
        await db_engine.close()

    bulk: Bulk
    if engine == "sqlite":
        bulk = SqliteBulk(make_url(url).database or "")
    else:
        bulk = await PostgresBulk.open(url)
    seconds: dict[str, float] = {"users": loop.time() - started}
    await bulk.insert_history(get_user.user_id, sizes.get_user, courses)
    await bulk.insert_history(small.user_id, sizes.list_small, courses)
    mark = loop.time()
    await bulk.insert_history(big.user_id, sizes.list_big, courses)
    seconds["big_user"] = loop.time() - mark
    await bulk.insert_history(crowd.user_id, sizes.newer_by_others, courses)
    for mixed in mixed_users:
        await bulk.insert_history(mixed.user_id, sizes.mixed_user_purchases, courses)
    mark = loop.time()
    pool = [secrets.token_hex(16) for _ in range(sizes.pending_pool)]
    for start in range(0, len(pool), 50_000):
        await bulk.insert_pending(fulfill_user.user_id, pool[start : start + 50_000], courses[0])
    seconds["pending_pool"] = loop.time() - mark
    mark = loop.time()
    await bulk.analyze()
    seconds["analyze"] = loop.time() - mark

    deep_cursors: dict[str, list[int]] = {}
    for label, owner in (("small", small), ("big", big)):
        low, high = await bulk.id_range(owner.user_id)
        span = high - low
        # Pages from the middle half of the history: far from the newest rows.
        deep_cursors[label] = [low + span // 4 + rng.randrange(span // 2) for _ in range(100)]
    dataset = Dataset(
        engine=engine,
        url=url,
        sizes=sizes,
        courses=courses,
        get_user=get_user,
        get_ids=await bulk.purchase_ids(get_user.user_id, sizes.get_user),
        list_users={"small": small, "big": big},
        deep_cursors=deep_cursors,
        fulfill_user=fulfill_user,
        payments_user=payments_user,
        mixed_users=mixed_users,
        mixed_ids={
            u.user_id: await bulk.purchase_ids(u.user_id, sizes.mixed_user_purchases)
            for u in mixed_users
        },
        bulk=bulk,
        seconds=seconds,
        pending_pool=pool,
    )
    seconds["total"] = loop.time() - started
    return dataset


async def take_pending(dataset: Dataset, count: int) -> list[str]:
    """``count`` pending purchases of the fulfill user no plan has used, from the pool
    (topped up first with new ones when it holds fewer)."""
    pool = dataset.pending_pool
    if len(pool) < count:
        more = count - len(pool) + 1_000
        pool += await fresh_pending(dataset, dataset.fulfill_user, more)
        dataset.topped_up += more
    taken = pool[:count]
    del pool[:count]
    return taken


def give_back(dataset: Dataset, unused: list[str]) -> None:
    """Return ids a plan certainly did not send (still pending) to the pool."""
    dataset.pending_pool[:0] = unused


async def fresh_pending(dataset: Dataset, user: BenchUser, count: int) -> list[str]:
    """Insert ``count`` new pending purchases of ``user``; return their ids."""
    ids = [secrets.token_hex(16) for _ in range(count)]
    await dataset.bulk.insert_pending(user.user_id, ids, dataset.courses[0])
    return ids


async def fresh_courses(dataset: Dataset, count: int) -> list[str]:
    """Insert ``count`` new courses no one is registered for; return their slugs."""
    tag = secrets.token_hex(4)
    slugs = [f"fresh-{tag}-{n}" for n in range(count)]
    await dataset.bulk.insert_courses(slugs)
    return slugs
