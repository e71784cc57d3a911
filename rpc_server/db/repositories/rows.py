"""What every repository shares: the connection it runs on, UTC datetimes, and lists of
ids bound one value each."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import BindParameter, bindparam

from rpc_server.db.connection import UnitOfWorkConnection

__all__ = [
    "IDS_PER_STATEMENT",
    "UnitOfWorkConnection",
    "as_utc",
    "id_binds",
    "id_chunks",
]

T = TypeVar("T")

# At most this many ids in one ``IN`` list (SQLite allows 32766 bound values, older
# builds 999): longer lists are sent in several statements.
IDS_PER_STATEMENT = 100


def id_binds(count: int) -> list[BindParameter[Any]]:
    """``count`` bound parameters ``id_0`` … for an ``IN`` list: one statement per count,
    built and compiled once (never an expanding ``IN``, compiled per call)."""
    return [bindparam(f"id_{n}") for n in range(count)]


def id_chunks(ids: Sequence[T]) -> Iterator[tuple[int, dict[str, T]]]:
    """``ids`` in chunks of at most ``IDS_PER_STATEMENT``: each chunk's length and its
    values by the names ``id_binds`` gives."""
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        chunk = ids[start : start + IDS_PER_STATEMENT]
        yield len(chunk), {f"id_{n}": value for n, value in enumerate(chunk)}


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC: everything we store is UTC. SQLite's are read as UTC already
    (``rpc_server.db.compile``), PostgreSQL's in the session's time zone."""
    if moment.tzinfo is UTC:
        return moment
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
