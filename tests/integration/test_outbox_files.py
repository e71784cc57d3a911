"""Receipts as ``.eml`` files: the mailer used when no SMTP URL is configured."""

from __future__ import annotations

import asyncio
import email
import email.policy
from dataclasses import replace
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.mail.deliverer import build_deliverer
from rpc_server.mail.mailer import FileMailer, TemporaryMailError, mailer_for
from rpc_server.mail.receipts import build_receipt, message_id_for
from tests.conftest import RpcCall, World
from tests.integration.smtp_server import (
    OutboxRow,
    assert_is_receipt,
    eventually,
    fulfilled_purchase,
    only_row,
    outbox_rows,
)
from tests.payments import proof_for


def read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def plain_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


async def test_deliverer_writes_one_readable_eml_per_receipt(
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    assert settings.smtp_url is None
    assert isinstance(mailer_for(settings.smtp_url, settings.mail_dir), FileMailer)
    alices = await fulfilled_purchase(uow_factory, world.alice.actor)
    bobs = await fulfilled_purchase(uow_factory, world.bob.actor, "sql-fundamentals")

    assert await build_deliverer(settings, uow_factory).deliver_all() == 2
    mail_dir = Path(settings.mail_dir)
    files = files_in(mail_dir)
    assert [path.suffix for path in files] == [".eml", ".eml"], files
    by_recipient = {str(message["To"]): message for message in map(read_eml, files)}
    assert_is_receipt(
        by_recipient["alice@example.com"], settings=settings, purchase_id=alices,
        recipient="alice@example.com", title="Python Basics", amount="49.00 USD",
    )  # fmt: skip
    assert_is_receipt(
        by_recipient["bob@example.com"], settings=settings, purchase_id=bobs,
        recipient="bob@example.com", title="SQL Fundamentals", amount="39.50 EUR",
    )  # fmt: skip
    # Named after the Message-ID, so a resend lands on the same file.
    assert mail_dir / f"receipt-{alices}_shop.example.eml" in files
    assert {row.status for row in await outbox_rows(engine)} == {"sent"}


async def test_fulfillment_over_http_writes_the_receipt_file(
    rpc: RpcCall, world: World, settings: Settings, engine: AsyncEngine
) -> None:
    """The app's deliverer (woken by the commit) writes the file; the poll is 5 s."""
    token = world.alice.token
    created = await rpc("purchase.create", {"course": "python-basics"}, token=token)
    purchase_id = created["result"]["purchase_id"]
    # The buyer pays, then fulfils with the payment's signed event (and repeats it later).
    paid = {
        "purchase_id": purchase_id,
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(created["result"]),
    }
    answer = await rpc("purchase.fulfill", paid, token=token)
    assert answer["result"]["purchase"]["state"] == "fulfilled", answer
    mail_dir = Path(settings.mail_dir)

    async def written() -> list[Path] | None:
        # Not the temporary file it is written to first: the .eml it is renamed to.
        return [path for path in files_in(mail_dir) if path.suffix == ".eml"] or None

    [path] = await eventually(written, within=2.0, what="the .eml file")
    assert read_eml(path)["Message-ID"] == message_id_for(purchase_id, settings.mail_from)
    await eventually(lambda: _row_with_status(engine, "sent"), what="the row to be sent")
    repeated = await rpc("purchase.fulfill", paid, token=token)
    assert repeated["result"] == answer["result"]
    await asyncio.sleep(0.2)
    assert files_in(mail_dir) == [path]


async def test_resending_a_receipt_replaces_its_file(
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """A deliverer wrote the file and died before recording it; after its lease another
    deliverer writes the receipt again: still one file, no temporary files left."""
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)
    now = services.utcnow()
    async with uow_factory(write=True) as uow:
        [job] = await uow.receipts.claim_due(
            now=now, lease_until=now + timedelta(seconds=0.2), token="crashed", limit=10
        )
        await uow.commit()
    mailer = FileMailer(Path(settings.mail_dir))
    message = build_receipt(job.receipt, mail_from=settings.mail_from)
    await mailer.send(message)
    await mailer.send(message)
    [path] = files_in(Path(settings.mail_dir))
    first = read_eml(path)

    await asyncio.sleep(0.25)
    assert await build_deliverer(settings, uow_factory).deliver_due() == 1
    assert files_in(Path(settings.mail_dir)) == [path]
    again = read_eml(path)  # rewritten: the same receipt (with a new MIME boundary)
    assert again["Message-ID"] == first["Message-ID"]
    assert again["Message-ID"] == message_id_for(purchase_id, settings.mail_from)
    assert plain_text(again) == plain_text(first)
    row = await only_row(engine)
    assert (row.status, row.attempts) == ("sent", 2)


async def test_unwritable_mail_dir_is_a_temporary_failure(
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    # A regular file where a directory should be: unwritable even for root.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    mail_dir = blocker / "mail"
    quick = replace(settings, mail_dir=str(mail_dir), mail_retry_base=0.05, mail_retry_cap=0.1)
    deliverer = build_deliverer(quick, uow_factory)
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)

    assert await deliverer.deliver_due() == 1
    row = await only_row(engine)
    assert (row.status, row.attempts, row.claim_token) == ("pending", 1, None)
    assert row.last_error is not None
    assert row.last_error.startswith(f"cannot write to {mail_dir}")

    blocker.unlink()  # the operator fixes the directory

    async def delivered() -> OutboxRow | None:
        await deliverer.deliver_due()
        return await _row_with_status(engine, "sent")

    row = await eventually(delivered, what="delivery once the directory is writable")
    assert row.attempts == 2
    [path] = files_in(mail_dir)
    assert read_eml(path)["Message-ID"] == message_id_for(purchase_id, settings.mail_from)


async def test_file_mailer_raises_a_temporary_error_for_an_unwritable_directory(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    message = EmailMessage()
    message["Message-ID"] = "<x@example.com>"
    message.set_content("hello")
    with pytest.raises(TemporaryMailError, match="cannot write to"):
        await FileMailer(blocker / "mail").send(message)
    assert blocker.read_text() == ""


async def _row_with_status(engine: AsyncEngine, status: str) -> OutboxRow | None:
    rows = await outbox_rows(engine)
    return rows[0] if len(rows) == 1 and rows[0].status == status else None


async def test_a_failed_write_leaves_no_partial_file_behind(tmp_path: Path) -> None:
    """The message goes to a temporary file renamed into place; when the rename fails
    (here a directory holds the message's name) the temporary file is removed too."""
    mail_dir = tmp_path / "mail"
    message = EmailMessage()
    message["Message-ID"] = "<x@example.com>"
    message.set_content("hello")
    (mail_dir / "x_example.com.eml").mkdir(parents=True)
    with pytest.raises(TemporaryMailError, match="cannot write to"):
        await FileMailer(mail_dir).send(message)
    assert [path.name for path in files_in(mail_dir)] == ["x_example.com.eml"]

    (mail_dir / "x_example.com.eml").rmdir()
    mail_dir.rmdir()  # removed while the server runs: made again, 0700
    await FileMailer(mail_dir).send(message)
    [path] = files_in(mail_dir)
    assert read_eml(path)["Message-ID"] == "<x@example.com>"
    assert (mail_dir.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)


def small_message(message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["Message-ID"] = f"<{message_id}@example.com>"
    message.set_content(f"hello {message_id}")
    return message


async def test_sends_at_the_same_time_are_written_together_each_with_its_own_outcome(
    tmp_path: Path,
) -> None:
    """The sends in flight go to the worker thread together; each returns once its own
    file is in place, and one message's failure (a directory holds its name) is its own."""
    mail_dir = tmp_path / "mail"
    (mail_dir / "m7_example.com.eml").mkdir(parents=True)
    mailer = FileMailer(mail_dir)
    ids = [f"m{index}" for index in range(20)]
    outcomes = await asyncio.gather(
        *(mailer.send(small_message(message_id)) for message_id in ids), return_exceptions=True
    )
    assert [type(outcome).__name__ for outcome in outcomes] == [
        "TemporaryMailError" if message_id == "m7" else "NoneType" for message_id in ids
    ]
    for message_id in ids:
        if message_id != "m7":
            path = mail_dir / f"{message_id}_example.com.eml"
            assert plain_text(read_eml(path)) == f"hello {message_id}\n"
    # Later sends start another write.
    await mailer.send(small_message("later"))
    assert (mail_dir / "later_example.com.eml").is_file()
    assert not [path for path in files_in(mail_dir) if path.suffix == ".tmp"]


async def test_a_send_cancelled_while_it_waits_is_not_written_and_holds_up_no_other(
    tmp_path: Path,
) -> None:
    mail_dir = tmp_path / "mail"
    mailer = FileMailer(mail_dir)
    first = asyncio.create_task(mailer.send(small_message("first")))
    second = asyncio.create_task(mailer.send(small_message("second")))
    await asyncio.sleep(0)  # both wait for the write that the first one started
    second.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert [path.name for path in files_in(mail_dir)] == ["first_example.com.eml"]


async def test_closing_the_file_mailer_lets_the_write_under_way_finish(tmp_path: Path) -> None:
    mail_dir = tmp_path / "mail"
    mailer = FileMailer(mail_dir)
    sends = [asyncio.create_task(mailer.send(small_message(f"m{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    await mailer.close()
    assert len(files_in(mail_dir)) == 3
    await asyncio.gather(*sends)
