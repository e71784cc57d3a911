"""Statements compiled once by SQLAlchemy, for the driver to run: the database layer's one
use of SQLAlchemy's compiler.

Repositories build their statements once, at import, as SQLAlchemy Core constructs with
bound parameters. ``StatementCache`` compiles each of them once per set of parameter names
into a ``CompiledStatement``: the SQL in the driver's parameter style, the order of its
positional parameters, values bound in the statement itself, and SQLAlchemy's bind and
result processing (SQLite's datetimes and decimals). The driver then runs the SQL
(``rpc_server.db.sqlite``, ``rpc_server.db.postgres``): SQLAlchemy's execution layer
(execution context, cursor adapter, result objects, greenlet hand-offs) is not on the path.

What this module reads of a compiled statement is SQLAlchemy's documented "Core
Internals" API (``SQLCompiler``), kept here and nowhere else:

- ``string`` and ``positiontup``: the SQL and the names of its positional parameters;
- ``construct_params()``: values bound in the statement (``literal()``, ``values(x=1)``);
- ``binds``: each parameter's ``BindParameter``, whose type gives the bind processor;
- ``insert_prefetch``: columns whose Python-side scalar default an INSERT must send;
- ``post_compile_params``: whether the SQL is only known with the values (an expanding
  ``IN``), which would mean compiling per call; no statement here has one, and
  ``compile_statement`` refuses it.

Bind and result processors come from the column types' public ``bind_processor`` and
``result_processor`` (the hooks custom types implement). Results are processed only on
SQLite; asyncpg's values are already Python's, and its dialect's numeric result processor
expects a cursor description that this path does not have. On SQLite a plain
``DateTime`` column is read as an aware UTC datetime in one step (``_sqlite_utc``), the
stock processor kept for text in a form ``fromisoformat`` does not read.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import DateTime
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler

Row = tuple[Any, ...]
Processor = Callable[[Any], Any] | None


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
    # The result columns that need processing, by index (empty: rows need none).
    result_processors: tuple[tuple[int, Callable[[Any], Any]], ...]

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
        if not processors:
            return Rows([tuple(row) for row in raw])
        # Only the columns that have a processor are visited: a purchase's row has 14
        # columns and 4 processors (SQLite's datetimes and decimal), 2.8 -> 1.4 µs a row.
        rows = []
        for row in raw:
            values = list(row)
            for index, process in processors:
                values[index] = process(values[index])
            rows.append(tuple(values))
        return Rows(rows)


def compile_statement(
    statement: ClauseElement, dialect: Dialect, keys: Sequence[str], *, process_results: bool
) -> CompiledStatement:
    """Compile ``statement`` as ``Connection.execute`` would for parameters ``keys``."""
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
    if compiled.post_compile_params:
        raise sa_exc.ArgumentError(
            "an expanding IN would be compiled for every call: bind one parameter per value"
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
    result_processors: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
    if process_results and isinstance(statement, Executable):
        columns = getattr(statement, "exported_columns", ())
        found = (_result_processor(c.type, dialect) for c in columns)
        result_processors = tuple((i, p) for i, p in enumerate(found) if p is not None)
    return CompiledStatement(
        sql=compiled.string,
        names=names,
        bound=bound,
        bind_processors=bind_processors,
        result_processors=result_processors,
    )


def _result_processor(column_type: Any, dialect: Dialect) -> Processor:
    stock = cast(Processor, column_type.dialect_impl(dialect).result_processor(dialect, None))
    if dialect.name == "sqlite" and type(column_type) is DateTime and stock is not None:
        return _sqlite_utc(stock)
    return stock


def _sqlite_utc(stock: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A ``DateTime`` column read on SQLite: the text SQLAlchemy stored
    (``2026-12-05 21:14:27.326000``, UTC as everything here) read as an aware UTC
    datetime at once. The stock processor's naive datetime made aware afterwards
    (``datetime.replace``) took 0.8 µs a value, ``fromisoformat`` with the offset
    appended 0.1 µs; a purchase has three. Text in another form goes the stock way."""
    parse = datetime.fromisoformat

    def process(value: Any) -> Any:
        if type(value) is str:
            try:
                return parse(value + "+00:00")
            except ValueError:
                pass
        moment = stock(value)
        return moment if moment is None else moment.replace(tzinfo=UTC)

    return process


class StatementCache:
    """Compiled forms, per statement object (held weakly) and parameter names.

    ``compilations`` counts how often each SQL text was compiled: a statement built for
    one call, instead of once at import, shows up as the same SQL compiled again (a test
    walks every repository method and checks that nothing is compiled twice).
    """

    def __init__(self, dialect: Dialect, *, process_results: bool):
        self.dialect = dialect
        self.compilations: Counter[str] = Counter()
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
            # The same names in another order: the same compiled form.
            ordered = tuple(sorted(keys))
            compiled = by_keys.get(ordered)
            if compiled is None:
                compiled = by_keys[ordered] = compile_statement(
                    statement, self.dialect, ordered, process_results=self._process_results
                )
                self.compilations[compiled.sql] += 1
            by_keys[keys] = compiled
        return compiled
