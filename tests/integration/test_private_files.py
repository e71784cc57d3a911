"""Files the server creates are readable by its user only, whatever the umask.

The SQLite database (and the ``-wal`` and ``-shm`` files SQLite makes beside it), the
mail directory and the ``.eml`` receipts: 0600 files, 0700 directories. Each test runs
under a umask that would make them readable by others (the usual 022, and 000).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text

from rpc_server.db.migrate import migrate
from rpc_server.db.stock_engine import stock_engine
from rpc_server.mail.mailer import FileMailer
from rpc_server.mail.receipts import Receipt, build_receipt
from tests.conftest import sqlite_url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def loose_umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


async def test_the_database_file_and_its_wal_and_shm_are_private(
    tmp_path: Path, loose_umask: int
) -> None:
    path = tmp_path / "shop.sqlite3"
    await migrate(sqlite_url(path))
    assert mode(path) == 0o600

    engine = stock_engine(sqlite_url(path))
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO users (email, is_staff, created_at) VALUES (:e, false, :t)"),
                {"e": "alice@example.com", "t": datetime.now(UTC)},
            )
            # While a connection is open in WAL mode, SQLite keeps -wal and -shm beside.
            companions = [Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(p.exists() for p in companions)
            assert [mode(p) for p in companions] == [0o600, 0o600]
    finally:
        await engine.dispose()


async def test_an_existing_database_file_keeps_the_mode_its_operator_gave_it(
    tmp_path: Path, loose_umask: int
) -> None:
    path = tmp_path / "shared.sqlite3"
    path.touch()
    path.chmod(0o640)
    await migrate(sqlite_url(path))
    assert mode(path) == 0o640


def _receipt() -> Receipt:
    return Receipt(
        purchase_id="0123456789abcdef0123456789abcdef",
        recipient="alice@example.com",
        course_title="Python Basics",
        amount=Decimal("49.00"),
        currency="USD",
        fulfilled_at=datetime(2026, 12, 2, 7, 30, tzinfo=UTC),
    )


async def test_the_mail_directory_and_receipts_are_private(
    tmp_path: Path, loose_umask: int
) -> None:
    directory = tmp_path / "var" / "mail"
    await FileMailer(directory).send(build_receipt(_receipt(), mail_from="shop@example.com"))
    assert mode(directory) == 0o700
    [written] = directory.iterdir()
    assert written.suffix == ".eml"
    assert mode(written) == 0o600
    # A resend replaces the file, still private.
    await FileMailer(directory).send(build_receipt(_receipt(), mail_from="shop@example.com"))
    assert [mode(p) for p in directory.iterdir()] == [0o600]


async def test_an_existing_mail_directory_keeps_its_mode(tmp_path: Path, loose_umask: int) -> None:
    directory = tmp_path / "mail"
    directory.mkdir()
    directory.chmod(0o750)
    await FileMailer(directory).send(build_receipt(_receipt(), mail_from="shop@example.com"))
    assert mode(directory) == 0o750
    assert [mode(p) for p in directory.iterdir()] == [0o600]
