"""The receipt deliverer waits out a database outage with a warning, and reports any
other failure with its traceback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from rpc_server.db.errors import database_unavailable
from rpc_server.mail.deliverer import ReceiptDeliverer
from rpc_server.mail.mailer import FileMailer


class FailingUnitsOfWork:
    """A unit-of-work factory whose every unit of work fails as it starts."""

    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def __call__(self, *, write: bool = False) -> Any:
        self.calls += 1
        raise self.error


async def run_briefly(deliverer: ReceiptDeliverer, factory: FailingUnitsOfWork) -> None:
    running = asyncio.create_task(deliverer.run())
    for _ in range(400):  # until it failed, waited a poll, and tried again
        if factory.calls >= 2:
            break
        await asyncio.sleep(0.005)
    deliverer.stop()
    await asyncio.wait_for(running, 2)


@pytest.mark.parametrize(
    ("error", "level", "traceback"),
    [
        (OperationalError("SELECT 1", None, ConnectionRefusedError()), logging.WARNING, False),
        (ValueError("a bug"), logging.ERROR, True),
    ],
)
async def test_an_outage_is_a_warning_and_anything_else_an_error(
    error: Exception,
    level: int,
    traceback: bool,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory = FailingUnitsOfWork(error)
    deliverer = ReceiptDeliverer(
        factory,  # type: ignore[arg-type]
        FileMailer(tmp_path),
        mail_from="shop@example.com",
        poll_seconds=0.01,
        outage=database_unavailable,
    )
    with caplog.at_level(logging.INFO, logger="rpc_server.mail.deliverer"):
        await run_briefly(deliverer, factory)
    records = [r for r in caplog.records if r.name == "rpc_server.mail.deliverer"]
    assert records and {r.levelno for r in records} == {level}
    assert all((r.exc_info is not None) is traceback for r in records)
    if not traceback:
        assert "database unavailable (OperationalError)" in records[0].getMessage()
