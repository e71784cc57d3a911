"""What every repository shares: the connection it runs on, and UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime

from rpc_server.db.connection import UnitOfWorkConnection

__all__ = ["UnitOfWorkConnection", "as_utc"]


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
