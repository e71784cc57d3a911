"""Statements run on the pooled driver connection: SQLAlchemy compiles, the driver executes.

A unit of work (``database.UnitOfWorkConnection``) takes a connection from SQLAlchemy's
pool and runs its statements on the driver's own connection (aiosqlite's, with
``sqlite_driver.OneHopConnection``, or asyncpg's). SQLAlchemy still builds and compiles
every statement, for the engine's dialect, with its own bind and result processing
(SQLite's datetimes and decimals); what is left out is its execution layer (execution
context, cursor adapter, result object, greenlet hand-offs), which cost three to five
times the statement itself per call (``tests/benchmarks/profile.md``).

Compiled forms are kept per statement object, so the statements a repository builds
once are compiled once; a statement built for one call is compiled for that call, as
SQLAlchemy would without its cache.

Driver errors are raised as SQLAlchemy's exceptions (``IntegrityError``,
``OperationalError``, ``InterfaceError``, ``DBAPIError``), the same classes the engine
raises, so callers and the error table in ``errors`` see no difference.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler

from rpc_server.errors import UNAVAILABLE_SQLSTATE_PREFIXES
from rpc_server.sqlite_driver import OneHopConnection, begin_and_run, run_statement

Row = tuple[Any, ...]
Processor = Callable[[Any], Any] | None

# SQLSTATEs after which a connection is gone: connection exceptions, and the server
# shutting down, crashing or starting (57P01 to 57P03).
GONE_SQLSTATE_PREFIXES = ("08", "57P01", "57P02", "57P03")


class Rows:
    """A statement's rows, processed: what repositories read from a result."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Row]):
        self._rows = rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def all(self) -> list[Row]:
        return self._rows

    def first(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """One statement compiled for one dialect: SQL, parameter order, processors."""

    sql: str
    names: tuple[str, ...]  # positional parameters, in order
    bound: Mapping[str, Any]  # values bound in the statement itself (and column defaults)
    bind_processors: tuple[Processor, ...]
    result_processors: tuple[Processor, ...] | None  # None: rows need no processing

    def parameters(self, params: Mapping[str, Any] | None) -> list[Any]:
        values = self.bound if not params else {**self.bound, **params}
        try:
            arguments = [values[name] for name in self.names]
        except KeyError as missing:
            raise sa_exc.ArgumentError(f"no value for bind parameter {missing}") from None
        for index, process in enumerate(self.bind_processors):
            if process is not None:
                arguments[index] = process(arguments[index])
        return arguments

    def rows(self, raw: Sequence[Any]) -> Rows:
        processors = self.result_processors
        if processors is None:
            return Rows([tuple(row) for row in raw])
        return Rows(
            [
                tuple(
                    value if p is None else p(value)
                    for p, value in zip(processors, row, strict=True)
                )
                for row in raw
            ]
        )


def compile_statement(
    statement: ClauseElement, dialect: Dialect, keys: Sequence[str], *, process_results: bool
) -> CompiledStatement:
    """Compile ``statement`` as ``Connection.execute`` would for parameters ``keys``."""
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
    if compiled.post_compile_params:
        # "IN (:values)" with values known now (a statement built for one call).
        compiled = cast(
            SQLCompiler,
            statement.compile(
                dialect=dialect, column_keys=list(keys), compile_kwargs={"render_postcompile": True}
            ),
        )
    names = tuple(compiled.positiontup or ())
    given = dict.fromkeys(keys)
    bound: dict[str, Any] = {
        name: value
        for name, value in (compiled.construct_params(given) or {}).items()
        if name not in given
    }
    for column in getattr(compiled, "insert_prefetch", ()):  # Python-side column defaults
        default = column.default
        if default is None or not default.is_scalar:
            raise sa_exc.ArgumentError(f"column {column.key} needs a value")
        bound[column.key] = default.arg
    binds = compiled.binds
    bind_processors = tuple(
        binds[name].type.dialect_impl(dialect).bind_processor(dialect) if name in binds else None
        for name in names
    )
    result_processors: tuple[Processor, ...] | None = None
    if process_results and isinstance(statement, Executable):
        columns = getattr(statement, "exported_columns", ())
        found = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
        if any(p is not None for p in found):
            result_processors = found
    return CompiledStatement(
        sql=compiled.string,
        names=names,
        bound=bound,
        bind_processors=bind_processors,
        result_processors=result_processors,
    )


class StatementCache:
    """Compiled forms, per statement object (held weakly) and parameter names."""

    def __init__(self, dialect: Dialect, *, process_results: bool):
        self.dialect = dialect
        self._process_results = process_results
        self._compiled: weakref.WeakKeyDictionary[
            ClauseElement, dict[tuple[str, ...], CompiledStatement]
        ] = weakref.WeakKeyDictionary()

    def get(self, statement: ClauseElement, params: Mapping[str, Any] | None) -> CompiledStatement:
        keys = tuple(params) if params else ()
        by_keys = self._compiled.get(statement)
        if by_keys is None:
            by_keys = self._compiled[statement] = {}
        compiled = by_keys.get(keys)
        if compiled is None:
            compiled = by_keys[keys] = compile_statement(
                statement, self.dialect, sorted(keys), process_results=self._process_results
            )
        return compiled


class Driver(Protocol):
    """What a unit of work needs of a database driver's connection."""

    begin_sql: str
    # Whether rows need SQLAlchemy's result processing to become Python values.
    process_results: bool

    async def fetch(self, connection: Any, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        """Run one statement; return its rows (none for a statement without)."""

    async def begin_and_fetch(
        self, connection: Any, begin: str, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        """Open the transaction with ``begin``, then run the statement."""

    async def commit(self, connection: Any) -> None: ...

    async def rollback(self, connection: Any) -> None:
        """Roll back if a transaction is open; nothing otherwise."""

    def in_transaction(self, connection: Any) -> bool:
        """Whether a transaction is open on the connection (asks nobody)."""

    def is_gone(self, connection: Any, error: BaseException) -> bool:
        """Whether ``error`` means the connection is no longer usable."""

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        """The SQLAlchemy exception for a driver error; None if it is not one."""


def _sqlalchemy_error(
    error: Exception, sql: str, invalidated: bool, *, integrity: bool, unavailable: bool
) -> sa_exc.DBAPIError:
    if integrity:
        kind: type[sa_exc.DBAPIError] = sa_exc.IntegrityError
    elif unavailable or invalidated:
        kind = sa_exc.OperationalError
    else:
        kind = sa_exc.DBAPIError
    return kind(sql, None, error, connection_invalidated=invalidated)


class SqliteDriver:
    """``OneHopConnection``: each statement (BEGIN included, when asked) in one trip."""

    begin_sql = "BEGIN IMMEDIATE"
    # SQLite hands back decimals and datetimes as floats and text.
    process_results = True

    async def fetch(
        self, connection: OneHopConnection, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        return (await connection.run(run_statement, sql, arguments))[3]

    async def begin_and_fetch(
        self, connection: OneHopConnection, begin: str, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        return (await connection.run(begin_and_run, begin, sql, arguments))[3]

    async def commit(self, connection: OneHopConnection) -> None:
        await connection.commit()

    async def rollback(self, connection: OneHopConnection) -> None:
        await connection.rollback()  # no trip when no transaction is open

    def in_transaction(self, connection: OneHopConnection) -> bool:
        return connection._in_transaction()

    def is_gone(self, connection: OneHopConnection, error: BaseException) -> bool:
        return False  # a file: nothing goes away between statements

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        if not isinstance(error, sqlite3.Error):
            return None
        return _sqlalchemy_error(
            error,
            sql,
            invalidated,
            integrity=isinstance(error, sqlite3.IntegrityError),
            unavailable=isinstance(error, sqlite3.OperationalError),
        )


_BROKEN = (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class AsyncpgDriver:
    """asyncpg's connection: its own statement cache prepares each statement once."""

    begin_sql = "BEGIN"
    process_results = False  # asyncpg's values are already Python's

    async def fetch(self, connection: Any, sql: str, arguments: Sequence[Any]) -> Sequence[Any]:
        return await connection.fetch(sql, *arguments)  # type: ignore[no-any-return]

    async def begin_and_fetch(
        self, connection: Any, begin: str, sql: str, arguments: Sequence[Any]
    ) -> Sequence[Any]:
        await connection.execute(begin)
        return await connection.fetch(sql, *arguments)  # type: ignore[no-any-return]

    async def commit(self, connection: Any) -> None:
        await connection.execute("COMMIT")

    async def rollback(self, connection: Any) -> None:
        if self.in_transaction(connection):
            await connection.execute("ROLLBACK")

    def in_transaction(self, connection: Any) -> bool:
        return bool(connection.is_in_transaction())

    def is_gone(self, connection: Any, error: BaseException) -> bool:
        # A connection is never shared, so asyncpg complaining about the state of its
        # protocol ("another operation is in progress", "cannot switch to state …") means
        # the connection is broken: typically the server's termination notice arrived
        # and the socket's end has not been read yet.
        if connection.is_closed() or isinstance(error, _BROKEN):
            return True
        sqlstate = getattr(error, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate.startswith(GONE_SQLSTATE_PREFIXES)

    def translate(self, error: Exception, sql: str, invalidated: bool) -> Exception | None:
        if isinstance(error, asyncpg.InterfaceError):
            return sa_exc.InterfaceError(sql, None, error, connection_invalidated=invalidated)
        if isinstance(error, asyncpg.InternalClientError):
            return _sqlalchemy_error(
                error, sql, invalidated, integrity=False, unavailable=invalidated
            )
        if not isinstance(error, (asyncpg.PostgresError, OSError)):
            return None
        sqlstate = getattr(error, "sqlstate", None)
        return _sqlalchemy_error(
            error,
            sql,
            invalidated,
            integrity=isinstance(error, asyncpg.IntegrityConstraintViolationError),
            unavailable=isinstance(error, OSError)
            or (isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATE_PREFIXES)),
        )
