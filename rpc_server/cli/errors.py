"""How a failed ``rpc-server`` command reads: one line on stderr, never a traceback.

``cli.main`` runs every command through ``explain``: a ``CommandError`` raised by a
command is its own message; an exception from the environment (the database missing,
unreachable, refusing us, not migrated) is described by where it happened and what to
do, naming the host and database but never the password; anything else is one line
naming the exception, with the traceback logged at DEBUG.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]
from alembic.util import CommandError as AlembicError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from rpc_server.db.engines import sqlite_path
from rpc_server.db.schema_version import SchemaNotCurrent

# Exit statuses: 1 the environment (database, port), 2 the operator's input or settings.
FAILED = 1
USAGE = 2

# SQLSTATE classes: 08 connection exception, 53 insufficient resources, 57P operator
# intervention (shutting down, cannot connect now).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
DATABASE_URL_FORMS = "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/NAME"
# The engines and drivers the server runs on (rpc_server.db.engines.open_engine).
SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


class CommandError(Exception):
    """A command cannot go on; the message is the line the operator reads."""

    def __init__(self, message: str, exit_code: int = FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def check_database_url(database_url: str) -> None:
    """Raise unless the URL names a database the server runs on (its text is never echoed:
    it may hold a password)."""
    try:
        drivername = make_url(database_url).drivername
    except ArgumentError:
        drivername = None
    if drivername not in SUPPORTED_DRIVERS:
        raise CommandError(
            f"RPC_SERVER_DATABASE_URL is not a database URL: use {DATABASE_URL_FORMS}", USAGE
        )


def database_location(database_url: str) -> str:
    """The database a URL names, for messages: engine, name, host and port, no password."""
    url = make_url(database_url)
    path = sqlite_path(database_url)
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {path.resolve() if path else url.database or ':memory:'}"
    return f'the PostgreSQL database "{url.database}" at {postgres_address(database_url)}'


def postgres_address(database_url: str) -> str:
    url = make_url(database_url)
    return f"{url.host or 'localhost'}:{url.port or 5432}"


def require_database_file(database_url: str) -> None:
    """Raise unless the SQLite file a URL names exists (opening it would create it)."""
    path = sqlite_path(database_url)
    if path is not None and not path.exists():
        raise CommandError(
            f"no database at {path.resolve()}: run rpc-server migrate first "
            "(or rpc-server seed-demo for the demo)"
        )


def require_database_directory(database_url: str) -> None:
    """Raise unless the directory of the SQLite file a URL names exists (SQLite creates
    the file, not its directory)."""
    path = sqlite_path(database_url)
    if path is not None and not path.resolve().parent.is_dir():
        raise CommandError(
            f"cannot create the SQLite database {path.resolve()}: "
            f"directory {path.resolve().parent} does not exist"
        )


def explain(exc: BaseException, database_url: str) -> tuple[str, int]:
    """The line to print for ``exc`` (without ``error:``) and the exit status."""
    if isinstance(exc, CommandError):
        return str(exc), exc.exit_code
    if isinstance(exc, SchemaNotCurrent):
        return str(exc), FAILED
    if isinstance(exc, ArgumentError):  # its message may quote the URL, password and all
        return f"RPC_SERVER_DATABASE_URL is not a database URL: use {DATABASE_URL_FORMS}", USAGE
    try:
        location = database_location(database_url)
    except ArgumentError:
        location = "the database"
    for cause in causes(exc):
        message = _database_failure(cause, location, database_url)
        if message is not None:
            return message, FAILED
    if isinstance(exc, AlembicError):
        return f"cannot migrate {location}: {one_line(exc)}", FAILED
    detail = redact(one_line(exc), database_url)
    return (
        f"unexpected {type(exc).__name__}: {detail} (RPC_SERVER_LOG_LEVEL=DEBUG logs the "
        "traceback)",
        FAILED,
    )


def _database_failure(cause: BaseException, location: str, database_url: str) -> str | None:
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str) and isinstance(cause, asyncpg.PostgresError):
        url = make_url(database_url)
        if sqlstate == "3D000":  # invalid_catalog_name
            return (
                f'the PostgreSQL database "{url.database}" does not exist at '
                f"{postgres_address(database_url)}: create it (createdb {url.database}), then "
                "run rpc-server migrate"
            )
        if sqlstate.startswith("28"):  # invalid authorization: the server's own words
            return f"{location} refused the connection: {one_line(cause)}"
        if sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return f"{location} is unavailable: {one_line(cause)}"
        return None
    if isinstance(cause, OSError):  # refused, unresolvable, timed out, reset
        reason = cause.strerror or str(cause) or type(cause).__name__
        return f"cannot reach {location}: {reason}"
    if isinstance(cause, sqlite3.Error):
        return f"{location}: {one_line(cause)}"
    return None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps: SQLAlchemy's ``orig``, then ``__cause__``/``__context__``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and id(orig) not in seen:
            current = orig
        else:
            current = current.__cause__ or current.__context__


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def redact(text: str, database_url: str) -> str:
    """``text`` without the database URL or its password."""
    text = text.replace(database_url, "RPC_SERVER_DATABASE_URL")
    try:
        password = make_url(database_url).password
    except ArgumentError:
        return text
    if password:
        text = text.replace(str(password), "***")
    return text
