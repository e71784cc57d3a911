"""Driver errors as SQLAlchemy's exceptions, and which of them mean a broken connection
(``rpc_server.db.sqlite.SqliteEngine``, ``rpc_server.db.postgres.PostgresEngine``)."""

from __future__ import annotations

import sqlite3
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from rpc_server.db.connection import Engine
from rpc_server.db.errors import pool_timeout
from rpc_server.db.postgres import PostgresEngine
from rpc_server.db.sqlite import SqliteEngine, opens_transaction
from rpc_server.jsonrpc.errors import INTERNAL_ERROR, SERVICE_UNAVAILABLE
from tests.unit.test_errors import error_of


def postgres_engine() -> PostgresEngine:
    # Nothing connects until the first acquire: these tests never do.
    url = make_url("postgresql+asyncpg://app@db.invalid/shop")
    return PostgresEngine(url, size=1, overflow=0, timeout=1.0, connect_timeout=1.0)


def sqlite_engine() -> SqliteEngine:
    url = make_url("sqlite+aiosqlite:///:memory:")
    return SqliteEngine(url, size=1, overflow=0, timeout=1.0)


class Connection:
    def __init__(self, closed: bool = False):
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


def postgres_error(kind: type[asyncpg.PostgresError], sqlstate: str) -> asyncpg.PostgresError:
    error = kind("message")
    error.sqlstate = sqlstate
    return error


@pytest.mark.parametrize(
    ("error", "gone"),
    [
        (asyncpg.InternalClientError("cannot switch to state 12"), True),
        (asyncpg.InterfaceError("another operation is in progress"), True),
        (ConnectionResetError(), True),
        (postgres_error(asyncpg.AdminShutdownError, "57P01"), True),
        (postgres_error(asyncpg.ConnectionDoesNotExistError, "08003"), True),
        (postgres_error(asyncpg.UniqueViolationError, "23505"), False),
        (postgres_error(asyncpg.UndefinedTableError, "42P01"), False),
    ],
)
def test_asyncpg_errors_that_mean_the_connection_is_gone(error: BaseException, gone: bool) -> None:
    assert postgres_engine().is_gone(Connection(), error) is gone
    assert postgres_engine().is_gone(Connection(closed=True), ValueError()) is True


def test_a_sqlite_connection_is_never_gone() -> None:
    """A file does not go away between statements: a SQLite error fails the call, it is
    never retried on another connection."""
    error = sqlite3.OperationalError("database is locked")
    connection: Any = Connection()  # is_gone looks at nothing of SQLite's connection
    assert sqlite_engine().is_gone(connection, error) is False


@pytest.mark.parametrize(
    ("engine", "error", "invalidated", "kind", "code"),
    [
        (postgres_engine(), postgres_error(asyncpg.UniqueViolationError, "23505"), False,
         sa_exc.IntegrityError, INTERNAL_ERROR),
        (postgres_engine(), postgres_error(asyncpg.TooManyConnectionsError, "53300"), False,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (postgres_engine(), asyncpg.InternalClientError("cannot switch"), True,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (postgres_engine(), ConnectionRefusedError(), True,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (postgres_engine(), postgres_error(asyncpg.UndefinedTableError, "42P01"), False,
         sa_exc.DBAPIError, INTERNAL_ERROR),
        (sqlite_engine(), sqlite3.IntegrityError("UNIQUE constraint failed"), False,
         sa_exc.IntegrityError, INTERNAL_ERROR),
        (sqlite_engine(), sqlite3.OperationalError("database is locked"), False,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
    ],
)  # fmt: skip
def test_driver_errors_become_sqlalchemys_and_map_to_codes(
    engine: Engine,
    error: Exception,
    invalidated: bool,
    kind: type[sa_exc.DBAPIError],
    code: int,
) -> None:
    translated = engine.translate(error, "SELECT 1", invalidated)
    assert type(translated) is kind
    assert isinstance(translated, sa_exc.DBAPIError)
    assert translated.orig is error and translated.connection_invalidated is invalidated
    assert error_of(translated).code == code


def test_other_exceptions_are_not_driver_errors() -> None:
    assert postgres_engine().translate(ValueError("x"), "SELECT 1", False) is None
    assert sqlite_engine().translate(KeyError("x"), "SELECT 1", False) is None


def test_a_pool_timeout_answers_service_unavailable() -> None:
    """Every pooled connection busy for the pool timeout: -32000, saying which settings
    to look at."""
    error = pool_timeout(10, 2.5)
    assert isinstance(error, sa_exc.TimeoutError)
    assert "RPC_SERVER_DB_POOL_SIZE" in str(error)
    assert error_of(error).code == SERVICE_UNAVAILABLE


FIRST_WORDS = ("insert", "INSERT", "Update", "delete", "REPLACE", "replace", "select")
FIRST_WORDS += ("SELECT", "with", "pragma", "values")


@given(
    st.tuples(
        st.text(" \t\r\n", max_size=3),
        # (Not SAVEPOINT: outside a transaction SQLite itself opens one with it; it is
        # never the first statement sent without BEGIN IMMEDIATE before it.)
        st.sampled_from(FIRST_WORDS),
    )
)
def test_opens_transaction_is_what_the_sqlite3_module_does(statement: tuple[str, str]) -> None:
    """``begin_and_fetch`` leaves BEGIN IMMEDIATE to the sqlite3 module exactly when the
    module opens it: checked against the module itself, on every first word it may see."""
    space, word = statement
    bodies = {
        "insert": "INTO t VALUES (1)",
        "update": "t SET x = 2",
        "delete": "FROM t",
        "replace": "INTO t VALUES (3)",
        "select": "x FROM t",
        "with": "c AS (SELECT 1) SELECT * FROM c",
        "pragma": "user_version",
        "values": "(1)",
    }
    sql = f"{space}{word} {bodies[word.lower()]}"
    connection = sqlite3.connect(":memory:", isolation_level="IMMEDIATE")
    try:
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
        assert not connection.in_transaction
        connection.execute(sql)
        assert opens_transaction(sql) is connection.in_transaction
    finally:
        connection.close()
