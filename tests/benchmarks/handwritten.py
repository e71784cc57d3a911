"""Baseline (h), the hand-written server: the denominator of every database workload.

What an engineer would write by hand for ``purchase.get``, ``.list``, ``.create`` and
``.fulfill`` with bare aiohttp and orjson, doing the project's work (answers byte for
byte the project's, the audit trail and the receipt outbox row included) and nothing
of its machinery (no SQLAlchemy, Marshmallow, jsonrpcserver, middleware, access log,
rate limiter, receipt deliverer):

- The bearer token is looked up once per HTTP request (its SHA-256, on the unique
  ``token_hash`` index), when the first call of the request needs it.
- **SQLite**: one read connection and one write connection (aiosqlite), WAL,
  ``synchronous=NORMAL``, a busy timeout, foreign keys. Reads run in autocommit on the
  read connection, whatever request they belong to; a write is ``BEGIN IMMEDIATE …
  COMMIT`` on the write connection, writes serialized by an ``asyncio.Lock``.
- **PostgreSQL**: an asyncpg pool (``--pool-size``, 10), one connection held for the
  whole HTTP request; writes in ``connection.transaction()``. Giving it back costs no
  query (the pool's ``reset`` does nothing, as in the project: nothing to undo) and
  no timer (no idle lifetime: the pool is fixed).
- **A batch's items run one after another**, in order, on that one connection: one
  ``SELECT`` per ``purchase.get``, no coalescing, no task per item.
- ``purchase.fulfill`` is one transaction: the conditional ``UPDATE … RETURNING``
  (``WHERE purchase_id = ? AND state = ?``, the state it comes from: ``pending``
  first), the registration, the outbox row (recipient read by a subquery), the next seq
  from ``event_sequence`` and its ``purchase_events`` row; then the purchase's
  ``SELECT`` for the answer. When the ``UPDATE`` changes nothing, the ``SELECT`` tells
  404, a repeat (answered as is) or 409.
- ``purchase.list`` is the same keyset statement as the project's (and same_work.py's).
- ``purchase.create``, as the project with a cap on open purchases: the buyer held
  (``FOR NO KEY UPDATE`` on PostgreSQL; on SQLite ``BEGIN IMMEDIATE`` already serializes),
  the course, the idempotency key, the registration check, the count of open purchases,
  the insert, the event; then the ``SELECT``.

It takes no ``payment_proof`` (it verifies no proofs): a buyer's fulfil is refused with
402 ``missing``, as the project refuses one without proof; the payments scope fulfils.
Like same_work.py it queues its receipts due in 2100 (``RECEIPT_NOT_DUE``), so the
project's deliverer never sends them. SQL, params checks and answers come from
same_work.py; nothing from the project.

    python -m tests.benchmarks.handwritten --port P --database-url URL [--pool-size 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

import aiosqlite
import asyncpg
import orjson
from aiohttp import web
from sqlalchemy.engine import make_url

from tests.benchmarks import instrumentation
from tests.benchmarks.same_work import (
    APPLY,
    BY_KEY_SQL,
    CONFLICT,
    COURSE_SQL,
    GET_ANY_SQL,
    GET_SQL,
    INSERT_EVENT_SQL,
    INSERT_REGISTRATION_SQL,
    KEY_REUSED,
    MISSING_PROOF,
    RECEIPT_NOT_DUE,
    REGISTERED_SQL,
    SOURCES,
    STATES,
    TOKEN_SQL,
    TRANSITIONS,
    UNAUTHENTICATED,
    Actor,
    Dialect,
    JsonObject,
    ListKey,
    PostgresDialect,
    Row,
    RpcError,
    SqliteDialect,
    checked_purchase_id,
    create_params,
    fulfill_params,
    invalid_transition,
    list_args,
    list_key,
    list_page,
    list_params,
    list_statement,
    named_params,
    purchase_json,
    purchase_not_found,
    redirect_url,
)

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
)
# A change of state, conditional on the state it comes from; fulfilling also stamps
# fulfilled_at and clears payment_ref (no proof, no payment reference).
UPDATE_STATE_SQL = (
    "UPDATE purchases SET state = ?, error_msg = ?, updated_at = ?{fulfilled} "
    "WHERE purchases.purchase_id = ?{owner} AND purchases.state = ? "
    "RETURNING purchases.id, purchases.owner_id, purchases.course_id"
)
INSERT_RECEIPT_SQL = (
    "INSERT INTO receipt_outbox (purchase_id, recipient, status, attempts, next_attempt_at, "
    "created_at) VALUES (?, (SELECT users.email FROM users WHERE users.id = ?), 'pending', 0, "
    "?, ?)"
)
NEXT_SEQ_SQL = (
    "UPDATE event_sequence SET last_seq = event_sequence.last_seq + 1 "
    "WHERE event_sequence.id = 1 RETURNING event_sequence.last_seq"
)
HOLD_USER_SQL = "SELECT users.id FROM users WHERE users.id = ? FOR NO KEY UPDATE"
PENDING_OF_OWNER_SQL = (
    "SELECT count(*) FROM purchases WHERE purchases.owner_id = ? AND state = 'pending'"
)
INSERT_PURCHASE_SQL = (
    "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, state, "
    "idempotency_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
    "ON CONFLICT (owner_id, idempotency_key) DO NOTHING RETURNING purchases.id"
)


# --- the database: what one HTTP request works on ---------------------------------------


class Connection(Protocol):
    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]: ...


class Session(Connection, Protocol):
    """One HTTP request's access to the database: reads, and write transactions."""

    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...


class Database(Protocol):
    dialect: Dialect

    def session(self) -> AbstractAsyncContextManager[Session]: ...

    async def close(self) -> None: ...


class SqliteWriter:
    def __init__(self, connection: aiosqlite.Connection):
        self.connection = connection

    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]:
        return await self.connection.execute_fetchall(sql, params)  # type: ignore[return-value]


class SqliteDatabase:
    """One read connection for every request, one write connection behind a lock. The
    database is its own session: requests share the read connection (aiosqlite runs
    their statements one at a time on its thread)."""

    dialect: Dialect = SqliteDialect()

    def __init__(self, reader: aiosqlite.Connection, writer: aiosqlite.Connection):
        self.reader, self.writer = reader, SqliteWriter(writer)
        self.write_lock: asyncio.Lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteDatabase:
        connections = []
        for _ in range(2):
            connection = await aiosqlite.connect(path, isolation_level=None)
            for pragma in SQLITE_PRAGMAS:
                await connection.execute_fetchall(pragma)
            connections.append(connection)
        return cls(*connections)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        yield self

    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]:
        return await self.reader.execute_fetchall(sql, params)  # type: ignore[return-value]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """``BEGIN IMMEDIATE … COMMIT``, rolled back unless the block ends normally."""
        async with self.write_lock:
            writer = self.writer
            await writer.fetch("BEGIN IMMEDIATE")
            committed = False
            try:
                yield writer
                await writer.fetch("COMMIT")
                committed = True
            finally:
                if not committed:
                    await writer.fetch("ROLLBACK")

    async def close(self) -> None:
        await self.reader.close()
        await self.writer.connection.close()


class PostgresSession:
    def __init__(self, connection: asyncpg.Connection):
        self.connection = connection

    async def fetch(self, sql: str, *params: Any) -> Sequence[Row]:
        return await self.connection.fetch(sql, *params)  # type: ignore[no-any-return]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection.transaction():
            yield self


async def _nothing_to_reset(_connection: Any) -> None:
    """The pool's ``reset``: no session state is ever left behind (as in the project)."""


class PostgresDatabase:
    dialect: Dialect = PostgresDialect()

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, size: int) -> PostgresDatabase:
        # No idle timeout: a fixed pool, and no timer to rearm at every release.
        pool = await asyncpg.create_pool(
            dsn,
            min_size=size,
            max_size=size,
            reset=_nothing_to_reset,
            max_inactive_connection_lifetime=0,
        )
        return cls(pool)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        async with self.pool.acquire() as connection:
            yield PostgresSession(connection)

    async def close(self) -> None:
        await self.pool.close()


async def open_database(url: str, pool_size: int) -> Database:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return await SqliteDatabase.open(parsed.database or "")
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return await PostgresDatabase.open(dsn, pool_size)


# --- the methods ------------------------------------------------------------------------


class HandWritten:
    """The four methods, each given the request's session."""

    def __init__(self, database: Database, frontend_url: str):
        self.database, self.frontend_url = database, frontend_url.rstrip("/")
        d = self.dialect = database.dialect
        self.token_sql = d.sql(TOKEN_SQL)
        self.get_sql, self.get_any_sql = d.sql(GET_SQL), d.sql(GET_ANY_SQL)
        self.course_sql, self.by_key_sql = d.sql(COURSE_SQL), d.sql(BY_KEY_SQL)
        registered, self.registered_extra = d.limit(REGISTERED_SQL)
        self.registered_sql = d.sql(registered)
        self.hold_user_sql = d.sql(HOLD_USER_SQL) if isinstance(d, PostgresDialect) else None
        self.pending_sql = d.sql(PENDING_OF_OWNER_SQL)
        self.insert_purchase_sql = d.sql(INSERT_PURCHASE_SQL)
        self.insert_registration_sql = d.sql(INSERT_REGISTRATION_SQL)
        self.insert_receipt_sql = d.sql(INSERT_RECEIPT_SQL)
        self.next_seq_sql = d.sql(NEXT_SEQ_SQL)
        self.insert_event_sql = d.sql(INSERT_EVENT_SQL)
        self.update_sql = {
            (target, own): d.sql(
                UPDATE_STATE_SQL.format(
                    fulfilled=", fulfilled_at = ?, payment_ref = NULL"
                    if target == "fulfilled"
                    else "",
                    owner=" AND purchases.owner_id = ?" if own else "",
                )
            )
            for target in SOURCES
            for own in (False, True)
        }
        # The states a change may come from, the usual one first.
        self.sources = {
            target: sorted(states, key=lambda state: state != "pending")
            for target, states in SOURCES.items()
        }
        self.list_sql: dict[ListKey, tuple[str, tuple[int, ...]]] = {}
        self.receipt_due = d.timestamp(RECEIPT_NOT_DUE)

    async def authenticate(self, session: Session, token: str) -> Actor | None:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        now = self.dialect.timestamp(datetime.now(UTC))
        rows = await session.fetch(self.token_sql, token_hash, now)
        if not rows:
            return None
        user_id, email, scope = rows[0]
        return Actor(user_id, email, scope)

    async def _read(self, connection: Connection, purchase_id: str, actor: Actor) -> Row | None:
        if actor.sees_every_purchase:
            rows = await connection.fetch(self.get_any_sql, purchase_id)
        else:
            rows = await connection.fetch(self.get_sql, purchase_id, actor.user_id)
        return rows[0] if rows else None

    async def get(self, session: Session, actor: Actor, params: Any) -> Any:
        purchase_id = checked_purchase_id(named_params(params, ("purchase_id",)))
        row = await self._read(session, purchase_id, actor)
        if row is None:
            raise purchase_not_found(purchase_id)
        return purchase_json(self.dialect, row)

    async def list(self, session: Session, actor: Actor, params: Any) -> Any:
        state, limit, before = list_params(params)
        key = list_key(actor, state, before)
        if key not in self.list_sql:
            self.list_sql[key] = list_statement(self.dialect, key)
        sql, extra = self.list_sql[key]
        rows = await session.fetch(sql, *list_args(actor, state, before), limit + 1, *extra)
        return list_page(self.dialect, rows, limit)

    async def create(self, session: Session, actor: Actor, params: Any) -> Any:
        slug, key = create_params(params)
        d = self.dialect
        async with session.transaction() as tx:
            if self.hold_user_sql is not None:
                await tx.fetch(self.hold_user_sql, actor.user_id)
            courses = await tx.fetch(self.course_sql, slug)
            if not courses:
                raise RpcError(404, "Course not found", {"course": slug})
            course_pk, _slug, _title, price, currency = courses[0]
            if key is not None:
                earlier = await tx.fetch(self.by_key_sql, actor.user_id, key)
                if earlier:
                    return self._replayed(earlier[0], slug, key)
            registered = await tx.fetch(
                self.registered_sql, actor.user_id, course_pk, 1, *self.registered_extra
            )
            if registered:
                raise RpcError(409, "You are already registered for this course", {"course": slug})
            await tx.fetch(self.pending_sql, actor.user_id)  # the cap is never reached
            purchase_id = secrets.token_hex(16)
            now = d.timestamp(datetime.now(UTC))
            inserted = await tx.fetch(
                self.insert_purchase_sql, purchase_id, actor.user_id, course_pk,
                d.amount(price), currency, key, now, now,
            )  # fmt: skip
            if not inserted:  # a concurrent call with the same key won
                earlier = await tx.fetch(self.by_key_sql, actor.user_id, key)
                return self._replayed(earlier[0], slug, key or "")
            await self._append_event(tx, inserted[0][0], None, "pending", actor, None, None, now)
        row = await self._read(session, purchase_id, actor)
        assert row is not None
        return purchase_json(d, row)

    def _replayed(self, row: Row, slug: str, key: str) -> JsonObject:
        if row[5] != slug:
            raise RpcError(409, KEY_REUSED, {"idempotency_key": key, "course": row[5]})
        return purchase_json(self.dialect, row)

    async def _append_event(
        self,
        tx: Connection,
        purchase_pk: int,
        from_state: str | None,
        to_state: str,
        actor: Actor,
        evidence: str | None,
        error_msg: str | None,
        stamp: Any,
    ) -> None:
        [[seq]] = await tx.fetch(self.next_seq_sql)
        await tx.fetch(
            self.insert_event_sql, seq, purchase_pk, from_state, to_state, actor.user_id,
            actor.scope, "rpc", evidence, None, None, error_msg, stamp,
        )  # fmt: skip

    async def fulfill(self, session: Session, actor: Actor, params: Any) -> Any:
        purchase_id, requested, error_msg = fulfill_params(params)
        message = error_msg if requested == "failed" else None
        evidence = None
        if requested == "fulfilled":
            evidence = "staff_comp" if actor.scope == "staff" else "payments_scope"
        own = not actor.sees_every_purchase
        # A buyer cannot fulfil without a proof: nothing to try, only to answer.
        may_change = not (requested == "fulfilled" and actor.scope == "buyer")
        for _attempt in range(len(STATES)):
            changed = may_change and await self._change(
                session, actor, purchase_id, requested, message, evidence, own
            )
            row = await self._read(session, purchase_id, actor)
            if row is None:
                raise purchase_not_found(purchase_id)
            step = APPLY if changed else TRANSITIONS[(row[9], requested)]
            if step == CONFLICT:
                raise invalid_transition(row[9], requested)
            if step == APPLY and not changed:
                if not may_change:
                    raise RpcError(402, MISSING_PROOF, {"reason": "missing"})
                continue  # it changed state between the UPDATE and the SELECT: again
            break
        assert row is not None
        return {"redirect_url": redirect_url(self.frontend_url, row),
                "purchase": purchase_json(self.dialect, row)}  # fmt: skip

    async def _change(
        self,
        session: Session,
        actor: Actor,
        purchase_id: str,
        requested: str,
        message: str | None,
        evidence: str | None,
        own: bool,
    ) -> bool:
        """The change in one transaction; False when the purchase is in no state it may
        come from (or is not the actor's)."""
        d = self.dialect
        stamp = d.timestamp(datetime.now(UTC))
        values: list[Any] = [requested, message, stamp]
        if requested == "fulfilled":
            values.append(stamp)  # fulfilled_at
        values.append(purchase_id)
        if own:
            values.append(actor.user_id)
        sql = self.update_sql[(requested, own)]
        async with session.transaction() as tx:
            for source in self.sources[requested]:
                rows = await tx.fetch(sql, *values, source)
                if rows:
                    break
            else:
                return False
            purchase_pk, owner_id, course_id = rows[0]
            if requested == "fulfilled":
                await tx.fetch(
                    self.insert_registration_sql, purchase_pk, owner_id, course_id, stamp
                )
                await tx.fetch(
                    self.insert_receipt_sql, purchase_pk, owner_id, self.receipt_due, stamp
                )
            await self._append_event(
                tx, purchase_pk, source, requested, actor, evidence, message, stamp
            )
        return True


# --- HTTP ---------------------------------------------------------------------------------

SERVICE = web.AppKey("service", HandWritten)
METHODS = {
    "purchase.get": HandWritten.get,
    "purchase.list": HandWritten.list,
    "purchase.create": HandWritten.create,
    "purchase.fulfill": HandWritten.fulfill,
}
INVALID_REQUEST: JsonObject = {
    "jsonrpc": "2.0",
    "error": {"code": -32600, "message": "Invalid Request"},
    "id": None,
}
PARSE_ERROR = b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'


class Caller:
    """The request's bearer token, looked up once, when a call first needs it."""

    def __init__(self, service: HandWritten, session: Session, token: str | None):
        self.service, self.session, self.token = service, session, token
        self.looked_up = False
        self._actor: Actor | None = None

    async def actor(self) -> Actor:
        if self.token is None:
            raise RpcError(401, UNAUTHENTICATED)
        if not self.looked_up:
            self._actor = await self.service.authenticate(self.session, self.token)
            self.looked_up = True
        if self._actor is None:
            raise RpcError(401, UNAUTHENTICATED)
        return self._actor


async def answer_item(item: Any, caller: Caller) -> JsonObject | None:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        return INVALID_REQUEST
    method = METHODS.get(item.get("method"))  # type: ignore[arg-type]
    try:
        if method is None:
            raise RpcError(-32601, "Method not found", item.get("method"))
        actor = await caller.actor()
        result = await method(caller.service, caller.session, actor, item.get("params", {}))
    except RpcError as exc:
        answer: JsonObject = {"jsonrpc": "2.0", "error": exc.as_error(), "id": item.get("id")}
    else:
        answer = {"jsonrpc": "2.0", "result": result, "id": item.get("id")}
    return answer if "id" in item else None


async def handle_rpc(request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(body=PARSE_ERROR, content_type="application/json")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    service = request.app[SERVICE]
    collected: Any
    async with service.database.session() as session:
        caller = Caller(service, session, token.strip() if scheme.lower() == "bearer" else None)
        if isinstance(payload, list):
            if not payload:
                collected = INVALID_REQUEST
            else:
                answers = [await answer_item(item, caller) for item in payload]  # in order
                collected = [a for a in answers if a is not None] or None
        else:
            collected = await answer_item(payload, caller)
    if collected is None:
        return web.Response(status=204)
    return web.Response(body=orjson.dumps(collected), content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(database_url: str, pool_size: int, frontend_url: str) -> web.Application:
    app = web.Application()

    async def database(app: web.Application) -> AsyncIterator[None]:
        opened = await open_database(database_url, pool_size)
        app[SERVICE] = HandWritten(opened, frontend_url)
        yield
        await opened.close()

    app.cleanup_ctx.append(database)
    app.router.add_post("/rpc", handle_rpc)
    app.router.add_get("/healthz", handle_healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True, help="the project's SQLAlchemy URL")
    parser.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections")
    parser.add_argument("--frontend-url", default="http://localhost:3000")
    instrumentation.add_arguments(parser)
    args = parser.parse_args()
    app = create_app(args.database_url, args.pool_size, args.frontend_url)
    instrumentation.attach(app, args)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
