"""A database of realistic size, and the engine's plan of a statement as the server runs it.

``seed`` fills a migrated database with one heavy buyer (``HEAVY`` purchases), a second
buyer whose purchases are all newer, and a crowd of small buyers, with what those
purchases leave behind: registrations, receipts (sent, a few dead, a backlog due, a few
claimed), the audit trail, tokens, rate-limit buckets. Every row comes from an
``INSERT … SELECT`` over a recursive CTE or over rows already there, so seeding takes
seconds on either engine.

``explain`` plans a statement compiled by the server's own ``StatementCache`` (the SQL
and the parameter order the repositories send) on the server's own driver:
``EXPLAIN QUERY PLAN`` lines on SQLite; on PostgreSQL ``EXPLAIN (FORMAT JSON)`` with the
values (the custom plan) or, with ``generic=True``, the plan PostgreSQL builds without
them, which it may switch to after five runs of a prepared statement (asyncpg prepares
every statement once per connection and keeps it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement

from rpc_server.db.connection import Engine
from tests.integration.test_registration_and_pending_plans import NUMBERS, plan_nodes

HEAVY = 100_000  # the heavy buyer's purchases
NEWER = 20_000  # the second buyer's, all newer than the heavy buyer's
OPEN = 40  # the newest purchases of the heavy and the second buyer, pending
CROWD = 2_000  # small buyers, with CROWD_PURCHASES each (the newest pending), newer still
CROWD_PURCHASES = 5
BACKLOG = 500  # receipts due (the newest)
CLAIMED = 20  # receipts claimed by a deliverer (among the backlog)
BUCKETS = 5_000  # rate-limit buckets (PostgreSQL)
COURSES = 500  # the catalogue, besides the three the buyers bought or not


@dataclass(frozen=True)
class Shape:
    """Values that find rows in the seeded database."""

    heavy: int  # user id of the heavy buyer
    other_course: int  # a course the heavy buyer holds no registration for
    purchase_id: str  # one of the heavy buyer's purchases, deep in the middle
    purchase_pk: int
    purchase_ids: tuple[str, ...]  # 50 of the heavy buyer's, spread over all of them
    idempotency_key: str  # the heavy buyer's
    payment_ref: str
    payment_event_id: str
    claim_token: str  # held by CLAIMED receipts
    outbox_id: int  # a dead receipt
    token_hash: str
    email: str
    slug: str
    deep_cursor: int  # the heavy buyer's page cursor halfway down (purchases)
    registration_cursor: int  # and among the heavy buyer's registrations


# Purchase ids are prefix || n, n from 1. A buyer's newest OPEN purchases are pending (at
# most the default cap on open purchases); of the others one in 50 failed, one in 50 was
# canceled, the rest fulfilled (with a payment reference). Every fourth has an idempotency
# key; two courses alternate (their ids are filled in: in a CASE a bound value would be
# text to PostgreSQL).
_PURCHASES = (
    NUMBERS + "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, "
    "state, idempotency_key, payment_ref, created_at, updated_at, fulfilled_at) "
    "SELECT :prefix || n, :owner, CASE WHEN n % 2 = 0 THEN {course} ELSE {other} END, "
    "49.00, 'USD', state, CASE WHEN n % 4 = 0 THEN 'key-' || n END, "
    "CASE WHEN state = 'fulfilled' THEN 'pay-' || :prefix || n END, :now, :now, "
    "CASE WHEN state = 'fulfilled' THEN :now END "
    "FROM (SELECT n, CASE WHEN n > :count - {open_} THEN 'pending' WHEN n % 50 = 0 "
    "THEN 'failed' WHEN n % 50 = 1 THEN 'canceled' ELSE 'fulfilled' END AS state FROM g) AS s"
)
_CATALOGUE = (
    NUMBERS + "INSERT INTO courses (slug, title, price, currency) "
    "SELECT 'course-' || n, 'Course ' || n, 10.00, 'EUR' FROM g"
)
_CROWD_USERS = (
    NUMBERS + "INSERT INTO users (email, is_staff, created_at) "
    "SELECT 'crowd-' || n || '@example.com', false, :now FROM g"
)
# Each small buyer's newest purchase is pending.
_CROWD_PURCHASES = (
    NUMBERS + "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, "
    "state, payment_ref, created_at, updated_at, fulfilled_at) "
    "SELECT 'c' || u.id || '-' || n, u.id, {course}, 49.00, 'USD', "
    "CASE WHEN n = :count THEN 'pending' ELSE 'fulfilled' END, "
    "CASE WHEN n < :count THEN 'pay-c' || u.id || '-' || n END, :now, :now, "
    "CASE WHEN n < :count THEN :now END "
    "FROM users AS u CROSS JOIN g WHERE u.email LIKE 'crowd-%' ORDER BY u.id, n"
)
# What the purchases left behind. A purchase's audit trail is one event here (numbered by
# the purchase's key): its creation while pending, the payment that settled it after.
_AFTER_PURCHASES = (
    "INSERT INTO api_tokens (user_id, token_hash, created_at, scope) "
    "SELECT id, 'hash-' || id, created_at, 'buyer' FROM users",
    "INSERT INTO course_registrations (purchase_id, user_id, course_id, created_at) "
    "SELECT id, owner_id, course_id, updated_at FROM purchases WHERE state = 'fulfilled' "
    "ORDER BY id",
    "INSERT INTO receipt_outbox (purchase_id, recipient, status, attempts, next_attempt_at, "
    "created_at, sent_at) "
    "SELECT p.id, u.email, CASE WHEN p.id % 1000 = 7 THEN 'dead' ELSE 'sent' END, 1, "
    "p.updated_at, p.updated_at, CASE WHEN p.id % 1000 <> 7 THEN p.updated_at END "
    "FROM purchases AS p JOIN users AS u ON u.id = p.owner_id WHERE p.state = 'fulfilled' "
    "ORDER BY p.id",
    "INSERT INTO purchase_events (seq, purchase_id, from_state, to_state, actor_user_id, "
    "actor_scope, source, evidence, payment_event_id, payment_ref, created_at) "
    "SELECT id, id, CASE WHEN state <> 'pending' THEN 'pending' END, state, "
    "CASE WHEN state = 'pending' THEN owner_id END, "
    "CASE WHEN state = 'pending' THEN 'buyer' END, "
    "CASE WHEN state = 'pending' THEN 'rpc' ELSE 'webhook' END, "
    "CASE WHEN state = 'fulfilled' THEN 'payment_event' END, "
    "CASE WHEN state = 'fulfilled' THEN 'evt-' || purchase_id END, payment_ref, updated_at "
    "FROM purchases ORDER BY id",
    "UPDATE event_sequence SET last_seq = (SELECT max(seq) FROM purchase_events)",
)
_BACKLOG = (
    "UPDATE receipt_outbox SET status = 'pending', sent_at = NULL, attempts = 0 "
    "WHERE id > (SELECT max(id) FROM receipt_outbox) - :backlog",
    "UPDATE receipt_outbox SET claim_token = :token, attempts = 1, next_attempt_at = :now "
    "WHERE id > (SELECT max(id) FROM receipt_outbox) - :claimed",
)
_BUCKETS = (
    NUMBERS + "INSERT INTO rate_limit_buckets (key, tokens, updated_at, last_granted) "
    "SELECT 'user:' || n, 10, now(), 1 FROM g"
)
_FOREIGN_KEYS = (
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace ORDER BY conname"
)
_MOMENT = bindparam("now", type_=DateTime(timezone=True))  # as the server binds datetimes


async def seed(engine: AsyncEngine) -> Shape:
    """Fill a freshly migrated database (see the module docstring); no statistics."""
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    async with engine.begin() as connection:

        async def run(sql: str, **values: Any) -> Any:
            statement = text(sql)
            if "now" in values:
                statement = statement.bindparams(_MOMENT)
            return await connection.execute(statement, values)

        async def scalar(sql: str, **values: Any) -> Any:
            return (await run(sql, **values)).scalar_one()

        foreign_keys = []
        if engine.dialect.name == "postgresql":
            # PostgreSQL checks a foreign key row by row (a lookup and a row lock each):
            # two thirds of the seeding. As its manual advises for bulk loads, they are
            # dropped, then added back as they were, each checked by one query.
            foreign_keys = (await run(_FOREIGN_KEYS)).all()
            for table, name, _ in foreign_keys:
                await run(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        await run(
            "INSERT INTO courses (slug, title, price, currency) VALUES "
            "('python-basics', 'Python Basics', 49.00, 'USD'), "
            "('sql-fundamentals', 'SQL Fundamentals', 39.50, 'EUR'), "
            "('rust-from-zero', 'Rust From Zero', 59.00, 'EUR')"
        )
        await run(_CATALOGUE, count=COURSES)
        course = await scalar("SELECT id FROM courses WHERE slug = 'python-basics'")
        other = await scalar("SELECT id FROM courses WHERE slug = 'sql-fundamentals'")
        unbought = await scalar("SELECT id FROM courses WHERE slug = 'rust-from-zero'")
        await run(
            "INSERT INTO users (email, is_staff, created_at) VALUES "
            "('heavy@example.com', false, :now), ('newer@example.com', false, :now)",
            now=now,
        )
        heavy = await scalar("SELECT id FROM users WHERE email = 'heavy@example.com'")
        newer = await scalar("SELECT id FROM users WHERE email = 'newer@example.com'")
        await run(_CROWD_USERS, count=CROWD, now=now)
        purchases = _PURCHASES.format(course=int(course), other=int(other), open_=OPEN)
        for owner, prefix, count in ((heavy, "h", HEAVY), (newer, "n", NEWER)):
            await run(purchases, count=count, prefix=prefix, owner=owner, now=now)
        crowd = _CROWD_PURCHASES.format(course=int(course))
        await run(crowd, count=CROWD_PURCHASES, now=now)
        for sql in _AFTER_PURCHASES:
            await run(sql)
        token = "claimed-by-a-deliverer"
        await run(_BACKLOG[0], backlog=BACKLOG)
        await run(_BACKLOG[1], claimed=CLAIMED, token=token, now=now)
        if engine.dialect.name == "postgresql":
            await run(_BUCKETS, count=BUCKETS)
        for table, name, definition in foreign_keys:
            await run(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        middle = HEAVY // 2 + 4  # fulfilled, with an idempotency key
        pk = await scalar("SELECT id FROM purchases WHERE purchase_id = :p", p=f"h{middle}")
        dead = await scalar("SELECT min(id) FROM receipt_outbox WHERE status = 'dead'")
        registration = await scalar(
            "SELECT id FROM course_registrations WHERE purchase_id = :pk", pk=pk
        )
    spread = tuple(f"h{n}" for n in range(HEAVY // 100, HEAVY, HEAVY // 50))
    return Shape(
        heavy=heavy,
        other_course=unbought,
        purchase_id=f"h{middle}",
        purchase_pk=pk,
        purchase_ids=spread,
        idempotency_key=f"key-{middle}",
        payment_ref=f"pay-h{middle}",
        payment_event_id=f"evt-h{middle}",
        claim_token=token,
        outbox_id=dead,
        token_hash=f"hash-{heavy}",
        email="heavy@example.com",
        slug="python-basics",
        deep_cursor=pk,
        registration_cursor=registration,
    )


async def analyze(engine: AsyncEngine) -> None:
    """Statistics: what ``ANALYZE`` (or PostgreSQL's autovacuum) leaves for the planner."""
    async with engine.begin() as connection:
        await connection.execute(text("ANALYZE"))


@dataclass(frozen=True)
class Read:
    """How a plan reads a table: ``search`` (an index or key range from the statement's
    conditions), ``walk`` (an index or the table's key in order, from one end: cheap only
    where a LIMIT stops it) or ``scan`` (every row, PostgreSQL's Seq Scan). ``index``
    names it as PostgreSQL does on both engines: ``pk_<table>`` for the primary key (on
    SQLite the rowid), ``uq_<table>_<columns>`` for a UNIQUE constraint (SQLite's
    ``sqlite_autoindex_*``)."""

    table: str
    kind: str
    index: str | None


@dataclass(frozen=True)
class Plan:
    reads: tuple[Read, ...]
    sorts: bool  # rows are sorted (SQLite's TEMP B-TREE, PostgreSQL's Sort nodes)
    cost: float | None  # PostgreSQL's estimate of the total cost
    text: str  # for failure messages

    def __str__(self) -> str:
        return self.text


_SQLITE_READ = re.compile(
    r"^(?P<verb>SCAN|SEARCH) (?P<table>\w+)(?: AS \w+)?"
    r"(?: USING (?:(?:COVERING )?INDEX (?P<index>\w+)|(?P<rowid>INTEGER PRIMARY KEY)))?"
)


async def explain(
    engine: Engine, statement: ClauseElement, values: Mapping[str, Any], *, generic: bool = False
) -> Plan:
    """The plan of ``statement`` compiled and bound as a repository would run it with
    ``values`` (on PostgreSQL its custom plan or, ``generic``, its generic one)."""
    compiled = engine.statements.get(statement, values)
    arguments = compiled.parameters(values)
    connection = await engine.acquire()
    try:
        if engine.dialect_name == "sqlite":
            rows = await engine.fetch(connection, "EXPLAIN QUERY PLAN " + compiled.sql, arguments)
            tables, names = await _sqlite_schema(engine, connection)
            return _sqlite_plan([str(row[3]) for row in rows], tables, names)
        explain = "EXPLAIN (FORMAT JSON) "
        if not generic:
            rows = await engine.fetch(connection, explain + compiled.sql, arguments)
        else:
            # The plan built without the values: PREPARE, then EXPLAIN EXECUTE with the
            # planner told to use the generic plan (its values are then never looked at).
            await engine.fetch(connection, "PREPARE plan_probe AS " + compiled.sql, ())
            try:
                await engine.fetch(connection, "SET plan_cache_mode = force_generic_plan", ())
                nulls = ", ".join("NULL" for _ in arguments)
                execute = f"EXECUTE plan_probe({nulls})" if arguments else "EXECUTE plan_probe"
                rows = await engine.fetch(connection, explain + execute, ())
            finally:
                await engine.fetch(connection, "RESET plan_cache_mode", ())
                await engine.fetch(connection, "DEALLOCATE plan_probe", ())
        document = rows[0][0]
        return _postgres_plan((json.loads(document) if isinstance(document, str) else document)[0])
    finally:
        await engine.release(connection)


async def _sqlite_schema(engine: Engine, connection: Any) -> tuple[set[str], dict[str, str]]:
    """The tables, and SQLite's names of the indexes behind UNIQUE constraints as
    PostgreSQL names them."""
    rows = await engine.fetch(connection, "SELECT name FROM sqlite_master WHERE type = 'table'", ())
    tables = {str(row[0]) for row in rows}
    names: dict[str, str] = {}
    for table in tables:
        for row in await engine.fetch(connection, f"PRAGMA index_list('{table}')", ()):
            index = str(row[1])
            if index.startswith("sqlite_autoindex_"):
                info = await engine.fetch(connection, f"PRAGMA index_info('{index}')", ())
                columns = "_".join(str(column[2]) for column in info)
                names[index] = f"uq_{table}_{columns}"
    return tables, names


def _sqlite_plan(lines: list[str], tables: set[str], names: Mapping[str, str]) -> Plan:
    reads = []
    for line in lines:
        found = _SQLITE_READ.match(line)
        if found is None:
            continue  # LIST SUBQUERY, USE TEMP B-TREE, …
        # SQLite names a table by its alias: SQLAlchemy's are the table's name and _1, _2…
        table = found["table"]
        if table not in tables:
            table = re.sub(r"_[0-9]+$", "", table)
            if table not in tables:
                continue  # not a table: SCAN CONSTANT ROW, a CTE
        if found["index"] is not None:
            index = names.get(found["index"], found["index"])
        else:
            index = f"pk_{table}"  # the rowid: by key, or every row in key order
        reads.append(Read(table, "search" if found["verb"] == "SEARCH" else "walk", index))
    sorts = any("TEMP B-TREE" in line for line in lines)
    return Plan(tuple(reads), sorts, None, "\n".join(lines))


def _postgres_plan(document: dict[str, Any]) -> Plan:
    top = document["Plan"]
    nodes = plan_nodes(top)
    reads = []
    for node in nodes:
        kind, table = node["Node Type"], str(node.get("Relation Name", ""))
        if kind == "Seq Scan":
            reads.append(Read(table, "scan", None))
        elif kind in ("Index Scan", "Index Only Scan"):
            searched = "Index Cond" in node
            reads.append(Read(table, "search" if searched else "walk", node["Index Name"]))
        elif kind == "Bitmap Heap Scan":
            for below in plan_nodes(node):
                if below["Node Type"] == "Bitmap Index Scan":
                    reads.append(Read(table, "search", below["Index Name"]))
        elif "Conflict Arbiter Indexes" in node:  # INSERT … ON CONFLICT
            for index in node["Conflict Arbiter Indexes"]:
                reads.append(Read(table, "search", index))
    sorts = any(node["Node Type"] in ("Sort", "Incremental Sort") for node in nodes)
    return Plan(tuple(reads), sorts, float(top["Total Cost"]), "\n".join(_outline(top)))


def _outline(node: dict[str, Any], depth: int = 0) -> list[str]:
    """A PostgreSQL plan as EXPLAIN prints it, in short."""
    line = "  " * depth + node["Node Type"]
    for key, label in _OUTLINED:
        if key in node:
            line += f" {label}{node[key]}"
    line += f" (rows={node['Plan Rows']} cost={node['Total Cost']})"
    return [line] + [text for child in node.get("Plans", []) for text in _outline(child, depth + 1)]


_OUTLINED = (
    ("Scan Direction", ""),
    ("Relation Name", "on "),
    ("Index Name", "using "),
    ("Index Cond", "cond "),
    ("Filter", "filter "),
)
