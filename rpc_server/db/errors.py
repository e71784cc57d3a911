"""Driver errors as SQLAlchemy's exception classes, which ``rpc_server.jsonrpc.errors`` maps."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


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
