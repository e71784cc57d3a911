"""Baseline (b): a bare aiohttp handler doing the project's work by hand.

``purchase.get`` and ``purchase.fulfill`` (and ``purchase.list`` and ``purchase.create``,
for the list and mixed workloads) as a hand-written server would do them: the bearer
token checked by its SHA-256 hash once per HTTP request, then, per call, the same SQL
statements the project emits (copied from SQLAlchemy's output for each dialect, in the
same order, placeholders aside), on the same driver (aiosqlite or asyncpg) with the same
connection settings (SQLite: WAL, 30 s busy timeout, foreign keys, synchronous=NORMAL,
``BEGIN IMMEDIATE`` for writes), answers serialized with orjson, byte for byte the
project's answers. Batch items run concurrently, as in the project. Like the project it
writes the audit trail: a create first checks that the buyer is not registered for the
course, and every create and state change takes the next seq from ``event_sequence``
(``UPDATE … RETURNING``) and inserts its ``purchase_events`` row, in its transaction.
It takes no ``payment_proof`` (it verifies no proofs): a buyer's fulfil is refused with
402 ``missing``; staff (a comp) and payments-scope tokens fulfil as in the project.

What it leaves out is the machinery: no SQLAlchemy, Marshmallow, jsonrpcserver,
middleware or access log. Reads run in autocommit (no BEGIN/ROLLBACK around them);
writes run in one ``BEGIN … COMMIT``; each statement is one driver call
(``execute_fetchall`` on aiosqlite, ``fetch``/``execute`` on asyncpg); connections come
from a fixed pool (``--pool-size``, default 10: the project's ``RPC_SERVER_DB_POOL_SIZE``).

With ``--coalesce-batch-reads`` (the ``get-batch-coalesced`` workload) a batch's
``purchase.get`` calls are read the way the project reads them, together, and better:
one ``SELECT … WHERE purchase_id IN (…)`` for the whole batch before its items run
(the project reads each round of its lanes together: about one statement per 10).

    python -m tests.benchmarks.same_work --port P --database-url URL [--coalesce-batch-reads]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import aiosqlite
import asyncpg
import orjson
from aiohttp import web
from sqlalchemy.engine import make_url

from tests.benchmarks import instrumentation

Row = Sequence[Any]
JsonObject = dict[str, Any]

# --- the SQL the project emits (rpc_server/db/repositories/), "?" placeholders ----------

TOKEN_SQL = (
    "SELECT users.id, users.email, api_tokens.scope FROM users "
    "JOIN api_tokens ON api_tokens.user_id = users.id "
    "WHERE api_tokens.token_hash = ? AND api_tokens.revoked_at IS NULL "
    "AND (api_tokens.expires_at IS NULL OR api_tokens.expires_at > ?)"
)
PURCHASE_SELECT = (
    "SELECT purchases.id, purchases.purchase_id, purchases.owner_id, users.email, "
    "purchases.course_id, courses.slug, courses.title, purchases.amount, purchases.currency, "
    "purchases.state, purchases.error_msg, purchases.created_at, purchases.updated_at, "
    "purchases.fulfilled_at FROM purchases JOIN users ON users.id = purchases.owner_id "
    "JOIN courses ON courses.id = purchases.course_id"
)
GET_SQL = PURCHASE_SELECT + " WHERE purchases.purchase_id = ? AND purchases.owner_id = ?"
GET_ANY_SQL = PURCHASE_SELECT + " WHERE purchases.purchase_id = ?"
BY_KEY_SQL = PURCHASE_SELECT + " WHERE purchases.owner_id = ? AND purchases.idempotency_key = ?"
COURSE_SQL = (
    "SELECT courses.id, courses.slug, courses.title, courses.price, courses.currency "
    "FROM courses WHERE courses.slug = ?"
)
INSERT_PURCHASE_SQL = (
    "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, state, "
    "idempotency_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_REGISTRATION_SQL = (
    "INSERT INTO course_registrations (purchase_id, user_id, course_id, created_at) "
    "VALUES (?, ?, ?, ?)"
)
INSERT_RECEIPT_SQL = (
    "INSERT INTO receipt_outbox (purchase_id, recipient, status, attempts, next_attempt_at, "
    "created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
REGISTERED_SQL = (
    "SELECT course_registrations.id FROM course_registrations "
    "WHERE course_registrations.user_id = ? AND course_registrations.course_id = ?"
)
# The audit trail: every change (creation included) takes the next seq and appends its event.
NEXT_SEQ_SQL = (
    "UPDATE event_sequence SET last_seq=(event_sequence.last_seq + ?) WHERE event_sequence.id = ?"
)
INSERT_EVENT_SQL = (
    "INSERT INTO purchase_events (seq, purchase_id, from_state, to_state, actor_user_id, "
    "actor_scope, source, evidence, payment_event_id, payment_ref, error_msg, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The baselines queue their receipts due in 2100: the project's deliverer, which runs in
# ``rpc-server serve`` on the same database, never sends them (it would work for a
# baseline, on the CPU the servers share, while the baseline is measured).
RECEIPT_NOT_DUE = datetime(2100, 1, 1, tzinfo=UTC)
# Scopes that see and act on every purchase (rpc_server/domain/states.py).
SEES_EVERY_PURCHASE = ("staff", "payments")
MISSING_PROOF = (
    "Payment not verified: fulfilling a purchase needs a payment_proof (the signed payment "
    "event the payment step returned)"
)

# The fulfillment state table (rpc_server/domain/states.py), by hand.
APPLY, REPEAT, CONFLICT = "apply", "repeat", "conflict"
TRANSITIONS = {
    ("pending", "fulfilled"): APPLY, ("pending", "failed"): APPLY,
    ("pending", "canceled"): APPLY, ("failed", "fulfilled"): APPLY,
    ("failed", "failed"): REPEAT, ("failed", "canceled"): APPLY,
    ("fulfilled", "fulfilled"): REPEAT, ("fulfilled", "failed"): CONFLICT,
    ("fulfilled", "canceled"): CONFLICT, ("canceled", "fulfilled"): CONFLICT,
    ("canceled", "failed"): CONFLICT, ("canceled", "canceled"): REPEAT,
}  # fmt: skip
SOURCES = {
    target: tuple(sorted(current for (current, t), step in TRANSITIONS.items()
                         if t == target and step == APPLY))
    for target in ("fulfilled", "failed", "canceled")
}  # fmt: skip
STATES = ("pending", "fulfilled", "failed", "canceled")
PURCHASE_ID = re.compile(r"[0-9a-z]{1,64}")
CURSOR = re.compile(r"p([0-9]{1,19})")


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def as_error(self) -> JsonObject:
        error: JsonObject = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_params(param: str, message: str) -> RpcError:
    return RpcError(-32602, "Invalid params", {param: [message]})


# The project's messages (rpc_server/domain/errors.py, services.py).
UNAUTHENTICATED = "Unauthenticated: send a valid token as 'Authorization: Bearer <token>'"
KEY_REUSED = "This idempotency_key was already used for a purchase of another course"


def purchase_not_found(purchase_id: str) -> RpcError:
    return RpcError(404, "Purchase not found", {"purchase_id": purchase_id})


def invalid_transition(current: str, requested: str) -> RpcError:
    return RpcError(
        409,
        f"A {current} purchase cannot become {requested}",
        {"current_state": current, "requested_state": requested},
    )


# --- the database: one connection type per driver, a fixed pool -------------------------


class Connection(Protocol):
    async def fetch(self, sql: str, *params: Any) -> list[Row]: ...

    async def execute(self, sql: str, *params: Any) -> None: ...


class Dialect(Protocol):
    """What differs between SQLite and PostgreSQL: placeholders, BEGIN, value types."""

    begin_write: str
    unique_violation: type[Exception]

    def sql(self, sql: str, returning: str | None = None) -> str: ...

    def limit(self, sql: str) -> tuple[str, tuple[int, ...]]: ...

    def timestamp(self, moment: datetime) -> Any: ...

    def amount(self, value: Any) -> Any: ...

    def read_time(self, value: Any) -> datetime: ...


class SqliteConnection:
    def __init__(self, connection: aiosqlite.Connection):
        self.connection = connection

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return list(await self.connection.execute_fetchall(sql, params))

    async def execute(self, sql: str, *params: Any) -> None:
        await self.connection.execute_fetchall(sql, params)


class SqliteDialect:
    begin_write: str = "BEGIN IMMEDIATE"
    unique_violation: type[Exception] = sqlite3.IntegrityError

    def sql(self, sql: str, returning: str | None = None) -> str:
        return sql

    def limit(self, sql: str) -> tuple[str, tuple[int, ...]]:
        return sql + " LIMIT ? OFFSET ?", (0,)

    def timestamp(self, moment: datetime) -> str:
        # SQLAlchemy's storage format for DateTime on SQLite (naive UTC).
        return moment.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")

    def amount(self, value: Any) -> float:
        return float(value)

    def read_time(self, value: Any) -> datetime:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)


class PostgresConnection:
    def __init__(self, connection: asyncpg.Connection):
        self.connection = connection

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return list(await self.connection.fetch(sql, *params))

    async def execute(self, sql: str, *params: Any) -> None:
        await self.connection.execute(sql, *params)


class PostgresDialect:
    begin_write: str = "BEGIN"
    unique_violation: type[Exception] = asyncpg.UniqueViolationError

    def sql(self, sql: str, returning: str | None = None) -> str:
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        return numbered if returning is None else f"{numbered} RETURNING {returning}"

    def limit(self, sql: str) -> tuple[str, tuple[int, ...]]:
        return sql + " LIMIT ?", ()

    def timestamp(self, moment: datetime) -> datetime:
        return moment

    def amount(self, value: Any) -> Any:
        return value

    def read_time(self, value: Any) -> datetime:
        return value.astimezone(UTC)  # type: ignore[no-any-return]


class Pool:
    """A fixed set of connections handed out one caller at a time."""

    def __init__(self, connections: Sequence[Connection], close: Callable[[], Awaitable[None]]):
        self._idle: asyncio.Queue[Connection] = asyncio.Queue()
        for connection in connections:
            self._idle.put_nowait(connection)
        self.close = close

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        connection = await self._idle.get()
        try:
            yield connection
        finally:
            self._idle.put_nowait(connection)


async def open_pool(url: str, size: int) -> tuple[Pool, Dialect]:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        raw = []
        for _ in range(size):
            connection = await aiosqlite.connect(parsed.database or "", isolation_level=None)
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA busy_timeout=30000",
                "PRAGMA foreign_keys=ON",
                "PRAGMA synchronous=NORMAL",
            ):
                await connection.execute_fetchall(pragma)
            raw.append(connection)

        async def close_sqlite() -> None:
            for connection in raw:
                await connection.close()

        return Pool([SqliteConnection(c) for c in raw], close_sqlite), SqliteDialect()
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    connections = [await asyncpg.connect(dsn) for _ in range(size)]

    async def close_postgres() -> None:
        for connection in connections:
            await connection.close()

    return Pool([PostgresConnection(c) for c in connections], close_postgres), PostgresDialect()


@asynccontextmanager
async def write_transaction(pool: Pool, dialect: Dialect) -> AsyncIterator[Transaction]:
    """One write transaction, rolled back unless committed (like the project's unit of work)."""
    async with pool.acquire() as connection:
        await connection.execute(dialect.begin_write)
        transaction = Transaction(connection)
        try:
            yield transaction
        finally:
            if not transaction.committed:
                await connection.execute("ROLLBACK")


@dataclass
class Transaction:
    connection: Connection
    committed: bool = False

    async def commit(self) -> None:
        await self.connection.execute("COMMIT")
        self.committed = True


# --- the methods ------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    user_id: int
    email: str
    scope: str  # the token's: buyer, staff or payments

    @property
    def sees_every_purchase(self) -> bool:
        return self.scope in SEES_EVERY_PURCHASE


class Service:
    """The four methods, written against the driver."""

    def __init__(self, pool: Pool, dialect: Dialect, frontend_url: str):
        self.pool, self.dialect, self.frontend_url = pool, dialect, frontend_url.rstrip("/")
        d = dialect
        self.token_sql = d.sql(TOKEN_SQL)
        self.get_sql, self.get_any_sql = d.sql(GET_SQL), d.sql(GET_ANY_SQL)
        self.by_key_sql, self.course_sql = d.sql(BY_KEY_SQL), d.sql(COURSE_SQL)
        self.insert_purchase_sql = d.sql(INSERT_PURCHASE_SQL, returning="purchases.id")
        self.insert_registration_sql = d.sql(
            INSERT_REGISTRATION_SQL, returning="course_registrations.id"
        )
        self.insert_receipt_sql = d.sql(INSERT_RECEIPT_SQL, returning="receipt_outbox.id")
        registered, self.registered_extra = d.limit(REGISTERED_SQL)
        self.registered_sql = d.sql(registered)
        self.next_seq_sql = (
            NEXT_SEQ_SQL + " RETURNING last_seq"
            if isinstance(d, SqliteDialect)
            else d.sql(NEXT_SEQ_SQL, returning="event_sequence.last_seq")
        )
        self.insert_event_sql = d.sql(INSERT_EVENT_SQL)
        self.transition_sql: dict[tuple[str, int], str] = {}
        self.list_sql: dict[ListKey, tuple[str, tuple[int, ...]]] = {}
        self.by_ids_sql: dict[tuple[int, bool], str] = {}

    async def authenticate(self, token: str) -> Actor | None:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        now = self.dialect.timestamp(datetime.now(UTC))
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(self.token_sql, token_hash, now)
        if not rows:
            return None
        user_id, email, scope = rows[0]
        return Actor(user_id, email, scope)

    def purchase_json(self, row: Row) -> JsonObject:
        return purchase_json(self.dialect, row)

    async def _purchase(self, connection: Connection, purchase_id: str, actor: Actor) -> Row | None:
        if actor.sees_every_purchase:
            rows = await connection.fetch(self.get_any_sql, purchase_id)
        else:
            rows = await connection.fetch(self.get_sql, purchase_id, actor.user_id)
        return rows[0] if rows else None

    async def read_many(self, actor: Actor, purchase_ids: Sequence[str]) -> dict[str, Row]:
        """The purchases among ``purchase_ids`` the actor may see, by id, in one statement
        per 100 ids."""
        found: dict[str, Row] = {}
        for start in range(0, len(purchase_ids), 100):
            chunk = list(purchase_ids[start : start + 100])
            key = (len(chunk), actor.sees_every_purchase)
            if key not in self.by_ids_sql:
                where = " WHERE purchases.purchase_id IN (" + ", ".join("?" * len(chunk)) + ")"
                owner = "" if actor.sees_every_purchase else " AND purchases.owner_id = ?"
                self.by_ids_sql[key] = self.dialect.sql(PURCHASE_SELECT + where + owner)
            args = chunk if actor.sees_every_purchase else [*chunk, actor.user_id]
            async with self.pool.acquire() as connection:
                for row in await connection.fetch(self.by_ids_sql[key], *args):
                    found[row[1]] = row
        return found

    async def get(self, actor: Actor, params: Any, read: dict[str, Row] | None = None) -> Any:
        """``read``: the batch's purchases, read beforehand (``--coalesce-batch-reads``)."""
        purchase_id = checked_purchase_id(named_params(params, ("purchase_id",)))
        if read is not None:
            row = read.get(purchase_id)
        else:
            async with self.pool.acquire() as connection:
                row = await self._purchase(connection, purchase_id, actor)
        if row is None:
            raise purchase_not_found(purchase_id)
        return self.purchase_json(row)

    async def list(self, actor: Actor, params: Any) -> Any:
        state, limit, before = list_params(params)
        key = list_key(actor, state, before)
        if key not in self.list_sql:
            self.list_sql[key] = list_statement(self.dialect, key)
        sql, extra = self.list_sql[key]
        args = list_args(actor, state, before)
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(sql, *args, limit + 1, *extra)
        return list_page(self.dialect, rows, limit)

    async def create(self, actor: Actor, params: Any) -> Any:
        slug, key = create_params(params)
        d = self.dialect
        async with write_transaction(self.pool, d) as tx:
            connection = tx.connection
            courses = await connection.fetch(self.course_sql, slug)
            if not courses:
                raise RpcError(404, "Course not found", {"course": slug})
            course_pk, _slug, _title, price, currency = courses[0]
            if key is not None:
                earlier = await connection.fetch(self.by_key_sql, actor.user_id, key)
                if earlier:
                    return self._replayed(earlier[0], slug, key)
            registered = await connection.fetch(
                self.registered_sql, actor.user_id, course_pk, 1, *self.registered_extra
            )
            if registered:
                raise RpcError(409, "You are already registered for this course", {"course": slug})
            purchase_id = secrets.token_hex(16)
            now = d.timestamp(datetime.now(UTC))
            await connection.execute("SAVEPOINT sa_savepoint_1")
            try:
                await connection.fetch(
                    self.insert_purchase_sql, purchase_id, actor.user_id, course_pk,
                    d.amount(price), currency, "pending", key, now, now,
                )  # fmt: skip
            except d.unique_violation:
                await connection.execute("ROLLBACK TO SAVEPOINT sa_savepoint_1")
                earlier = await connection.fetch(self.by_key_sql, actor.user_id, key)
                return self._replayed(earlier[0], slug, key or "")
            await connection.execute("RELEASE SAVEPOINT sa_savepoint_1")
            rows = await connection.fetch(self.get_sql, purchase_id, actor.user_id)
            await self._append_event(
                connection, rows[0][0], None, "pending", actor, None, None, now
            )
            await tx.commit()
        return self.purchase_json(rows[0])

    async def _append_event(
        self,
        connection: Connection,
        purchase_pk: int,
        from_state: str | None,
        to_state: str,
        actor: Actor,
        evidence: str | None,
        error_msg: str | None,
        stamp: Any,
    ) -> None:
        """The audit event of a change, in its transaction (rpc_server/db/repositories/)."""
        [[seq]] = await connection.fetch(self.next_seq_sql, 1, 1)
        await connection.execute(
            self.insert_event_sql, seq, purchase_pk, from_state, to_state, actor.user_id,
            actor.scope, "rpc", evidence, None, None, error_msg, stamp,
        )  # fmt: skip

    def _replayed(self, row: Row, slug: str, key: str) -> JsonObject:
        if row[5] != slug:
            raise RpcError(409, KEY_REUSED, {"idempotency_key": key, "course": row[5]})
        return self.purchase_json(row)

    async def fulfill(self, actor: Actor, params: Any) -> Any:
        purchase_id, requested, error_msg = fulfill_params(params)
        d = self.dialect
        async with write_transaction(self.pool, d) as tx:
            connection = tx.connection
            row = await self._purchase(connection, purchase_id, actor)
            if row is None:
                raise purchase_not_found(purchase_id)
            step = REPEAT
            for _attempt in range(len(STATES)):
                step = TRANSITIONS[(row[9], requested)]
                if step != APPLY:
                    break
                # Who may ask for it (states.OUTCOME_EVIDENCE), without proofs: this
                # baseline takes no payment_proof, so a buyer cannot fulfil.
                evidence = None
                if requested == "fulfilled":
                    if actor.scope == "buyer":
                        raise RpcError(402, MISSING_PROOF, {"reason": "missing"})
                    evidence = "staff_comp" if actor.scope == "staff" else "payments_scope"
                now = datetime.now(UTC)
                stamp = d.timestamp(now)
                sql = self._transition_sql(requested)
                message = error_msg if requested == "failed" else None
                values: list[Any] = [requested, message, stamp]
                if requested == "fulfilled":
                    values += [stamp, None]  # fulfilled_at, payment_ref (no proof)
                # Conditional on the state just read (a concurrent change makes it miss).
                before = row[9]
                changed = await connection.fetch(sql, *values, row[0], before)
                if not changed:  # lost a race: the winner's purchase, and the table again
                    refreshed = await self._purchase(connection, purchase_id, actor)
                    assert refreshed is not None
                    row = refreshed
                    continue
                # The row as the project builds it: as read, with what the UPDATE returned.
                state, message_now, updated_at, fulfilled_at = changed[0]
                row = (*row[:9], state, message_now, row[11], updated_at, fulfilled_at)
                if requested == "fulfilled":
                    await connection.fetch(
                        self.insert_registration_sql, row[0], row[2], row[4], stamp
                    )
                    await connection.fetch(
                        self.insert_receipt_sql, row[0], row[3], "pending", 0,
                        d.timestamp(RECEIPT_NOT_DUE), stamp,
                    )  # fmt: skip
                await self._append_event(
                    connection, row[0], before, requested, actor, evidence, message, stamp
                )
                await tx.commit()
                break
            if step == CONFLICT:
                raise invalid_transition(row[9], requested)
        return {
            "redirect_url": redirect_url(self.frontend_url, row),
            "purchase": self.purchase_json(row),
        }

    def _transition_sql(self, target: str) -> str:
        sources = 1  # the state read: "state IN (?)", as the project binds it
        key = (target, sources)
        if key not in self.transition_sql:
            fulfilled = ", fulfilled_at=?, payment_ref=?" if target == "fulfilled" else ""
            marks = ", ".join("?" * sources)
            sql = (
                f"UPDATE purchases SET state=?, error_msg=?, updated_at=?{fulfilled} "
                f"WHERE purchases.id = ? AND purchases.state IN ({marks})"
            )
            # The columns it changes (state, error_msg, updated_at, fulfilled_at), in the
            # order of the purchase's row.
            returning = "state, error_msg, updated_at, fulfilled_at"
            if isinstance(self.dialect, SqliteDialect):
                self.transition_sql[key] = f"{sql} RETURNING {returning}"
            else:
                self.transition_sql[key] = self.dialect.sql(sql, returning=returning)
        return self.transition_sql[key]


# --- params and answers, shared with the hand-written baseline (handwritten.py) ---------


def purchase_json(dialect: Dialect, row: Row) -> JsonObject:
    """A row of ``PURCHASE_SELECT`` as the project answers it."""
    fulfilled_at = row[13]
    return {
        "purchase_id": row[1],
        "course": row[5],
        "amount": format(row[7], ".2f"),
        "currency": row[8],
        "state": row[9],
        "error_msg": row[10],
        "created_at": dialect.read_time(row[11]).isoformat(),
        "updated_at": dialect.read_time(row[12]).isoformat(),
        "fulfilled_at": (
            None if fulfilled_at is None else dialect.read_time(fulfilled_at).isoformat()
        ),
    }


def redirect_url(frontend_url: str, row: Row) -> str:
    """Where the frontend goes after a fulfil (``rpc_server/domain/links.py``)."""
    course = quote(row[5], safe="")
    if row[9] == "fulfilled":
        return f"{frontend_url}/courses/{course}/start"
    if row[9] == "failed":
        return f"{frontend_url}/checkout/{quote(row[1], safe='')}"
    return f"{frontend_url}/courses/{course}"


def fulfill_params(params: Any) -> tuple[str, str, str | None]:
    """``purchase.fulfill``'s params checked: (purchase_id, requested state, error_msg)."""
    named = named_params(
        params, ("purchase_id", "purchase_state", "error_msg"),
        required=("purchase_id", "purchase_state"),
    )  # fmt: skip
    purchase_id = checked_purchase_id(named)
    requested, error_msg = named["purchase_state"], named.get("error_msg")
    if requested not in SOURCES:
        raise invalid_params("purchase_state", "Must be one of: fulfilled, failed, canceled.")
    if error_msg is not None and (not isinstance(error_msg, str) or len(error_msg) > 1000):
        raise invalid_params("error_msg", "Longer than maximum length 1000.")
    return purchase_id, requested, error_msg


def create_params(params: Any) -> tuple[str, str | None]:
    """``purchase.create``'s params checked: (course slug, idempotency key)."""
    named = named_params(params, ("course", "idempotency_key"), required=("course",))
    slug, key = named["course"], named.get("idempotency_key")
    if not isinstance(slug, str) or not 1 <= len(slug) <= 100:
        raise invalid_params("course", "Length must be between 1 and 100.")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 64):
        raise invalid_params("idempotency_key", "Length must be between 1 and 64.")
    return slug, key


def list_params(params: Any) -> tuple[str | None, int, int | None]:
    """``purchase.list``'s params checked: (state, limit, row id to continue before)."""
    named = named_params(params, ("state", "limit", "cursor"), required=())
    state, limit, cursor = named.get("state"), named.get("limit", 20), named.get("cursor")
    if state is not None and state not in STATES:
        raise invalid_params("state", "Must be one of: " + ", ".join(STATES) + ".")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
        raise invalid_params(
            "limit", "Must be greater than or equal to 1 and less than or equal to 100."
        )
    before = None if cursor is None else decode_cursor(cursor)
    return state, limit, before


ListKey = tuple[bool, bool, bool]


def list_key(actor: Actor, state: str | None, before: int | None) -> ListKey:
    """Which statement a page needs: (one owner's, by state, after a cursor)."""
    return (not actor.sees_every_purchase, state is not None, before is not None)


def list_statement(dialect: Dialect, key: ListKey) -> tuple[str, tuple[int, ...]]:
    """A page's statement (keyset, newest first) and its trailing parameters after LIMIT.

    As the project: one owner's first page names the owner as a range (so that
    PostgreSQL reads the (owner_id, id) index), later pages as an equality."""
    owner = "purchases.owner_id = ?" if key[2] else "purchases.owner_id BETWEEN ? AND ?"
    conditions = (owner, "purchases.state = ?", "purchases.id < ?")
    clauses = [c for c, on in zip(conditions, key, strict=True) if on]
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    order = "purchases.owner_id DESC, purchases.id DESC" if key[0] else "purchases.id DESC"
    sql, extra = dialect.limit(PURCHASE_SELECT + where + " ORDER BY " + order)
    return dialect.sql(sql), extra


def list_args(actor: Actor, state: str | None, before: int | None) -> list[Any]:
    """The parameters of ``list_statement`` before LIMIT."""
    owner_args = (actor.user_id,) if before is not None else (actor.user_id, actor.user_id)
    key = list_key(actor, state, before)
    return [
        a
        for values, on in zip((owner_args, (state,), (before,)), key, strict=True)
        if on
        for a in values
    ]


def list_page(dialect: Dialect, rows: Sequence[Row], limit: int) -> JsonObject:
    """A page's answer from up to ``limit + 1`` rows (one more tells there is a next)."""
    items = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = base64.urlsafe_b64encode(f"p{items[-1][0]}".encode()).decode().rstrip("=")
    return {"items": [purchase_json(dialect, r) for r in items], "next_cursor": next_cursor}


def named_params(
    params: Any, names: tuple[str, ...], required: tuple[str, ...] = ("purchase_id",)
) -> dict[str, Any]:
    if isinstance(params, list):
        if len(params) > len(names):
            raise invalid_params("params", f"Expected at most {len(names)} positional params.")
        params = dict(zip(names, params, strict=False))
    if not isinstance(params, dict):
        raise invalid_params("params", "Must be an array or an object.")
    for name in params:
        if name not in names:
            raise invalid_params(name, "Unknown field.")
    for name in required:
        if name not in params:
            raise invalid_params(name, "Missing data for required field.")
    return params


def checked_purchase_id(named: dict[str, Any]) -> str:
    value = named["purchase_id"]
    if not isinstance(value, str) or PURCHASE_ID.fullmatch(value) is None:
        raise invalid_params("purchase_id", "Not a valid purchase id.")
    return value


def decode_cursor(value: Any) -> int:
    error = invalid_params("cursor", "Not a valid cursor: pass next_cursor unchanged.")
    if not isinstance(value, str) or len(value) > 64:
        raise error
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise error from None
    match = CURSOR.fullmatch(decoded)
    if match is None:
        raise error
    return int(match[1])


# --- HTTP ---------------------------------------------------------------------------------

SERVICE = web.AppKey("service", Service)
COALESCE = web.AppKey("coalesce_batch_reads", bool)
Method = Callable[[Service, Actor, Any], Awaitable[Any]]
METHODS: dict[str, Method] = {
    "purchase.get": Service.get,
    "purchase.list": Service.list,
    "purchase.create": Service.create,
    "purchase.fulfill": Service.fulfill,
}


class Caller:
    """The HTTP request's bearer token, checked at most once however many items need it."""

    def __init__(self, service: Service, token: str | None):
        self.service, self.token = service, token
        self._actor: asyncio.Task[Actor | None] | None = None
        # The batch's purchases read beforehand (--coalesce-batch-reads), else None.
        self.read: dict[str, Row] | None = None

    async def actor(self) -> Actor:
        if self.token is None:
            raise RpcError(401, UNAUTHENTICATED)
        if self._actor is None:
            self._actor = asyncio.ensure_future(self.service.authenticate(self.token))
        actor = await asyncio.shield(self._actor)
        if actor is None:
            raise RpcError(401, UNAUTHENTICATED)
        return actor


async def answer_item(item: Any, caller: Caller) -> JsonObject | None:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
                "id": None}  # fmt: skip
    method = METHODS.get(item.get("method"))  # type: ignore[arg-type]
    try:
        if method is None:
            raise RpcError(-32601, "Method not found", item.get("method"))
        actor = await caller.actor()
        if method is Service.get and caller.read is not None:
            result = await caller.service.get(actor, item.get("params", {}), caller.read)
        else:
            result = await method(caller.service, actor, item.get("params", {}))
    except RpcError as exc:
        answer: JsonObject = {"jsonrpc": "2.0", "error": exc.as_error(), "id": item.get("id")}
    else:
        answer = {"jsonrpc": "2.0", "result": result, "id": item.get("id")}
    return answer if "id" in item else None


async def read_batch(payload: list[Any], caller: Caller) -> None:
    """Read every purchase the batch's valid ``purchase.get`` calls ask for, at once."""
    ids = []
    for item in payload:
        if isinstance(item, dict) and item.get("method") == "purchase.get":
            with contextlib.suppress(RpcError):  # then the item answers its own error
                named = named_params(item.get("params", {}), ("purchase_id",))
                ids.append(checked_purchase_id(named))
    if not ids:
        return
    try:
        actor = await caller.actor()
    except RpcError:
        return  # each item answers 401
    caller.read = await caller.service.read_many(actor, list(dict.fromkeys(ids)))


async def handle_rpc(request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
        return web.Response(body=body, content_type="application/json")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    caller = Caller(request.app[SERVICE], token.strip() if scheme.lower() == "bearer" else None)
    if isinstance(payload, list):
        if request.app[COALESCE]:
            await read_batch(payload, caller)
        answers = await asyncio.gather(*(answer_item(item, caller) for item in payload))
        collected: Any = [a for a in answers if a is not None] or None
    else:
        collected = await answer_item(payload, caller)
    if collected is None:
        return web.Response(status=204)
    return web.Response(body=orjson.dumps(collected), content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(
    database_url: str, pool_size: int, frontend_url: str, *, coalesce: bool = False
) -> web.Application:
    app = web.Application()
    app[COALESCE] = coalesce

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool, dialect = await open_pool(database_url, pool_size)
        app[SERVICE] = Service(pool, dialect, frontend_url)
        yield
        await pool.close()

    app.cleanup_ctx.append(database)
    app.router.add_post("/rpc", handle_rpc)
    app.router.add_get("/healthz", handle_healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True, help="the project's SQLAlchemy URL")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--frontend-url", default="http://localhost:3000")
    parser.add_argument(
        "--coalesce-batch-reads",
        action="store_true",
        help="read a batch's purchase.get calls with one statement",
    )
    instrumentation.add_arguments(parser)
    args = parser.parse_args()
    app = create_app(
        args.database_url, args.pool_size, args.frontend_url, coalesce=args.coalesce_batch_reads
    )
    instrumentation.attach(app, args)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
