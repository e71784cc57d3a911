"""Driver errors as SQLAlchemy's exceptions, and which of them mean a broken connection."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from rpc_server.drivers import AsyncpgDriver, SqliteDriver
from rpc_server.errors import INTERNAL_ERROR, SERVICE_UNAVAILABLE
from tests.unit.test_errors import error_of


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
    assert AsyncpgDriver().is_gone(Connection(), error) is gone
    assert AsyncpgDriver().is_gone(Connection(closed=True), ValueError()) is True


@pytest.mark.parametrize(
    ("driver", "error", "invalidated", "kind", "code"),
    [
        (AsyncpgDriver(), postgres_error(asyncpg.UniqueViolationError, "23505"), False,
         sa_exc.IntegrityError, INTERNAL_ERROR),
        (AsyncpgDriver(), postgres_error(asyncpg.TooManyConnectionsError, "53300"), False,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (AsyncpgDriver(), asyncpg.InternalClientError("cannot switch"), True,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (AsyncpgDriver(), ConnectionRefusedError(), True,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
        (AsyncpgDriver(), postgres_error(asyncpg.UndefinedTableError, "42P01"), False,
         sa_exc.DBAPIError, INTERNAL_ERROR),
        (SqliteDriver(), sqlite3.IntegrityError("UNIQUE constraint failed"), False,
         sa_exc.IntegrityError, INTERNAL_ERROR),
        (SqliteDriver(), sqlite3.OperationalError("database is locked"), False,
         sa_exc.OperationalError, SERVICE_UNAVAILABLE),
    ],
)  # fmt: skip
def test_driver_errors_become_sqlalchemys_and_map_to_codes(
    driver: AsyncpgDriver | SqliteDriver,
    error: Exception,
    invalidated: bool,
    kind: type[sa_exc.DBAPIError],
    code: int,
) -> None:
    translated = driver.translate(error, "SELECT 1", invalidated)
    assert type(translated) is kind
    assert isinstance(translated, sa_exc.DBAPIError)
    assert translated.orig is error and translated.connection_invalidated is invalidated
    assert error_of(translated).code == code


def test_other_exceptions_are_not_driver_errors() -> None:
    assert AsyncpgDriver().translate(ValueError("x"), "SELECT 1", False) is None
    assert SqliteDriver().translate(KeyError("x"), "SELECT 1", False) is None
