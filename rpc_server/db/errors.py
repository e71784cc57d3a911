"""Driver errors as SQLAlchemy's exception classes, and which of them mean the database
is not there right now (``rpc_server.jsonrpc.errors`` answers those -32000; the receipt
deliverer waits them out)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


def sqlalchemy_error(
    error: Exception, sql: str, invalidated: bool, *, integrity: bool, unavailable: bool
) -> sa_exc.DBAPIError:
    """The SQLAlchemy exception a stock engine would raise for a driver's ``error``."""
    if integrity:
        kind: type[sa_exc.DBAPIError] = sa_exc.IntegrityError
    elif unavailable or invalidated:
        kind = sa_exc.OperationalError
    else:
        kind = sa_exc.DBAPIError
    return kind(sql, None, error, connection_invalidated=invalidated)


def pool_timeout(size: int, timeout: float) -> sa_exc.TimeoutError:
    """Every pooled connection stayed busy for ``timeout`` seconds (-32000)."""
    return sa_exc.TimeoutError(
        f"all {size} pooled connections stayed busy for {timeout:.2f} s "
        "(RPC_SERVER_DB_POOL_SIZE, RPC_SERVER_DB_POOL_TIMEOUT)"
    )


# Failures of the database itself (unreachable, locked, pool exhausted): the call may
# be retried later. Never shown with their text.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    ConnectionError,
    TimeoutError,
)


# SQLSTATE classes that mean "the database is not there right now": connection
# exceptions, insufficient resources (too many connections), operator intervention
# (shutdown, crash, starting up). Anything else is a bug, not an outage.
UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P")


def database_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says the database cannot be reached, not that our SQL is wrong."""
    if isinstance(exc, UNAVAILABLE):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATE_PREFIXES)
    return False
