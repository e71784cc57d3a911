"""A compiled statement processes its rows as SQLAlchemy's column types define: on
SQLite, each column through its type's result processor (datetimes and decimals come
back as text and floats), only those columns touched, every other value as it came;
datetimes as aware UTC datetimes (everything stored is UTC)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from models import Purchase as PurchaseRow
from rpc_server.db.compile import compile_statement
from rpc_server.db.sqlite import sqlite_dialect

DIALECT = sqlite_dialect()
COLUMNS = list(PurchaseRow.__table__.columns)
STATEMENT = select(*COLUMNS)
COMPILED = compile_statement(STATEMENT, DIALECT, (), process_results=True)
PROCESSORS = [c.type.dialect_impl(DIALECT).result_processor(DIALECT, None) for c in COLUMNS]


def raw_value(column: Any) -> st.SearchStrategy[Any]:
    """What SQLite's driver hands back for ``column``: text for a datetime, a float for
    a decimal, None where the column allows it."""
    kind = column.type.python_type
    if kind is datetime:
        value: st.SearchStrategy[Any] = st.datetimes().map(lambda d: d.isoformat(" "))
    elif kind.__name__ == "Decimal":
        value = st.floats(min_value=0, max_value=1e9, allow_nan=False).map(lambda f: round(f, 2))
    elif kind is int:
        value = st.integers()
    else:
        value = st.text(max_size=8)
    return (value | st.none()) if column.nullable else value


ROWS = st.lists(st.tuples(*(raw_value(c) for c in COLUMNS)), max_size=5)


def test_only_the_columns_with_a_processor_are_processed() -> None:
    processed = {index for index, _ in COMPILED.result_processors}
    assert processed == {i for i, p in enumerate(PROCESSORS) if p is not None}
    assert {COLUMNS[i].name for i in processed} == {
        "amount", "created_at", "updated_at", "fulfilled_at",
    }  # fmt: skip


def as_sqlalchemy_reads_it(process: Any, value: Any) -> Any:
    """The definition: the column type's processor, then a datetime taken as UTC."""
    if process is None:
        return value
    processed = process(value)
    return processed.replace(tzinfo=UTC) if isinstance(processed, datetime) else processed


@given(ROWS)
def test_rows_are_processed_as_each_column_type_defines(raw: list[tuple[Any, ...]]) -> None:
    expected = [
        tuple(as_sqlalchemy_reads_it(p, value) for p, value in zip(PROCESSORS, row, strict=True))
        for row in raw
    ]
    processed = COMPILED.rows(raw).all()
    assert processed == expected
    # Equal is not enough for datetimes (an aware one never equals a naive one, but
    # the offset could differ): each is in UTC itself.
    for row in processed:
        for value in row:
            if isinstance(value, datetime):
                assert value.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    ["2026-12-05 21:14:27", "2026-12-05 21:14:27.000001", "2026-12-05T21:14:27.5"],
)
def test_datetime_text_in_other_forms_is_read_the_same(text: str) -> None:
    index = next(i for i, c in enumerate(COLUMNS) if c.name == "created_at")
    row = tuple(text if i == index else None for i in range(len(COLUMNS)))
    [processed] = COMPILED.rows([row]).all()
    assert processed[index] == as_sqlalchemy_reads_it(PROCESSORS[index], text)
