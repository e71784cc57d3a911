"""Receipts over SMTP, against a real SMTP server (aiosmtpd) started by each test.

Two ways in: the HTTP app with its deliverer running inside (the way ``serve`` runs),
and a ``ReceiptDeliverer`` driven pass by pass (``build_deliverer``) where the timing
of retries, leases and shutdown must be controlled.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import DELIVERER, create_app
from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.outbox import OutboxStatus
from rpc_server.mail.deliverer import ReceiptDeliverer, build_deliverer
from rpc_server.mail.mailer import (
    NO_STARTTLS,
    NO_TLS_FOR_CREDENTIALS,
    SmtpMailer,
    _plain_envelope,
)
from rpc_server.mail.receipts import Receipt, build_receipt, message_id_for
from tests.conftest import World
from tests.integration.smtp_server import (
    HOST,
    AuthAttempt,
    LocalCa,
    OutboxRow,
    SmtpServer,
    assert_is_receipt,
    eventually,
    free_port,
    fulfilled_purchase,
    more_courses,
    only_row,
    outbox_rows,
)
from tests.payments import proof_for

ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def fast(settings: Settings, smtp_url: str, **overrides: Any) -> Settings:
    """Settings that send to ``smtp_url`` and retry within a test's patience."""
    values: dict[str, Any] = {
        "smtp_url": smtp_url,
        "mail_retry_base": 0.05,
        "mail_retry_cap": 0.2,
        "mail_poll_interval": 0.1,
        "mail_max_attempts": 100,
    }
    return replace(settings, **(values | overrides))


@dataclass(frozen=True)
class Shop:
    """The app over HTTP, with its receipt deliverer running inside."""

    client: TestClient[Any, Any]
    # The one payment made for each purchase bought here (its signed event, as the
    # payment step hands it to the buyer); a retried fulfil carries the same one.
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def call(self, method: str, params: Any, *, token: str) -> Any:
        response = await self.client.post(
            "/rpc",
            json={"jsonrpc": "2.0", "method": method, "params": params, "id": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status == 200, await response.text()
        body = await response.json()
        assert "error" not in body, body
        return body["result"]

    async def buy(self, token: str, course: str = "python-basics") -> str:
        purchase = await self.call("purchase.create", {"course": course}, token=token)
        self.payments[purchase["purchase_id"]] = proof_for(purchase)
        return str(purchase["purchase_id"])

    async def fulfill(self, token: str, purchase_id: str) -> Any:
        """Fulfil as the buyer does, with the proof of the purchase's payment."""
        return await self.call(
            "purchase.fulfill",
            {
                "purchase_id": purchase_id,
                "purchase_state": "fulfilled",
                "payment_proof": self.payments[purchase_id],
            },
            token=token,
        )


OpenShop = Callable[..., Awaitable[Shop]]


@pytest.fixture
def open_shop(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> OpenShop:
    """``await open_shop(smtp_url, **settings overrides)``: an app sending to that URL."""

    async def open_(smtp_url: str, **overrides: Any) -> Shop:
        return Shop(await aiohttp_client(create_app(fast(settings, smtp_url, **overrides))))

    return open_


# --- over HTTP: the deliverer inside the app --------------------------------------------


async def test_fulfillment_sends_one_receipt_with_the_right_headers_and_content(
    open_shop: OpenShop, smtp: SmtpServer, world: World, settings: Settings, engine: AsyncEngine
) -> None:
    shop = await open_shop(smtp.url)
    purchase_id = await shop.buy(world.alice.token)
    answer = await shop.fulfill(world.alice.token, purchase_id)

    [received] = await smtp.wait_for(1)
    assert received.mail_from == "receipts@shop.example"
    assert received.login is None
    assert received.rcpt_tos == (ALICE,)
    message = received.message
    assert_is_receipt(
        message, settings=settings, purchase_id=purchase_id, recipient=ALICE,
        title="Python Basics", amount="49.00 USD",
    )  # fmt: skip
    fulfilled_at = datetime.fromisoformat(answer["purchase"]["fulfilled_at"])
    assert message["Date"].datetime == fulfilled_at.replace(microsecond=0)
    text_part = message.get_body(preferencelist=("plain",))
    assert text_part is not None
    assert f"{fulfilled_at:%Y-%m-%d %H:%M} UTC" in text_part.get_content()

    row = await eventually(
        lambda: _row_with_status(engine, "sent"), what="the outbox row to be marked sent"
    )
    assert row.attempts == 1
    assert row.claim_token is None and row.sent_at is not None
    await asyncio.sleep(0.3)  # a few polls later: still one message
    assert len(smtp.received) == 1


async def test_receipt_leaves_right_after_the_commit_not_at_the_next_poll(
    open_shop: OpenShop, smtp: SmtpServer, world: World
) -> None:
    """The fulfillment's commit wakes the deliverer: a 30 s poll is never waited for."""
    shop = await open_shop(smtp.url, mail_poll_interval=30.0)
    purchase_id = await shop.buy(world.alice.token)
    await asyncio.sleep(0.2)  # the deliverer's first pass is over: it sleeps until woken
    await shop.fulfill(world.alice.token, purchase_id)
    fulfilled = time.monotonic()
    [received] = await smtp.wait_for(1, within=2.0)
    assert time.monotonic() - fulfilled < 2.0
    assert received.message["Message-ID"] == message_id_for(purchase_id, "receipts@shop.example")


async def test_repeated_fulfills_send_one_receipt(
    open_shop: OpenShop, smtp: SmtpServer, world: World, engine: AsyncEngine
) -> None:
    shop = await open_shop(smtp.url)
    purchase_id = await shop.buy(world.alice.token)
    answers = [await shop.fulfill(world.alice.token, purchase_id) for _ in range(3)]
    await smtp.wait_for(1)
    await asyncio.sleep(0.1)
    answers.append(await shop.fulfill(world.alice.token, purchase_id))  # after the send, too
    await asyncio.sleep(0.4)
    assert all(answer == answers[0] for answer in answers)
    assert len(smtp.received) == 1
    assert [row.status for row in await outbox_rows(engine)] == ["sent"]


async def test_twenty_concurrent_fulfills_send_one_receipt(
    open_shop: OpenShop, smtp: SmtpServer, world: World, engine: AsyncEngine
) -> None:
    shop = await open_shop(smtp.url)
    purchase_id = await shop.buy(world.alice.token)
    answers = await asyncio.gather(
        *(shop.fulfill(world.alice.token, purchase_id) for _ in range(20))
    )
    assert {answer["purchase"]["state"] for answer in answers} == {"fulfilled"}
    [received] = await smtp.wait_for(1)
    assert received.message["Message-ID"] == message_id_for(purchase_id, "receipts@shop.example")
    await asyncio.sleep(0.5)
    assert len(smtp.received) == 1
    assert [row.status for row in await outbox_rows(engine)] == ["sent"]


async def test_smtp_down_during_fulfillment_neither_fails_nor_slows_it_and_mail_follows(
    open_shop: OpenShop, world: World, engine: AsyncEngine
) -> None:
    smtp = SmtpServer()  # not started: nothing listens on its port
    shop = await open_shop(smtp.url)
    purchase_id = await shop.buy(world.alice.token)
    started = time.perf_counter()
    answer = await shop.fulfill(world.alice.token, purchase_id)
    assert time.perf_counter() - started < 1.0
    assert answer["purchase"]["state"] == "fulfilled"

    # The deliverer tries, fails, backs off and tries again.
    row = await eventually(
        lambda: _row_matching(engine, lambda row: row.attempts >= 2),
        what="two failed attempts",
    )
    assert row.status == "pending"
    assert row.last_error is not None and "unreachable" in row.last_error
    assert smtp.received == []

    smtp.start()
    try:
        [received] = await smtp.wait_for(1)
        assert received.message["Message-ID"] == message_id_for(
            purchase_id, "receipts@shop.example"
        )
        await eventually(lambda: _row_with_status(engine, "sent"), what="the row to be sent")
        await asyncio.sleep(0.4)
        assert len(smtp.received) == 1
    finally:
        smtp.stop()


async def test_hanging_smtp_server_does_not_slow_fulfillment(
    open_shop: OpenShop,
    world: World,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
) -> None:
    """A server that accepts connections and never greets holds the deliverer in a send
    (for up to the SMTP timeout); fulfillments meanwhile answer at once, because no
    transaction is open across the send."""
    more = await more_courses(uow_factory, 1)
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)  # never accept(): connections wait in the backlog, unanswered
    try:
        shop = await open_shop(f"smtp://{HOST}:{listener.getsockname()[1]}")
        first = await shop.buy(world.alice.token)
        await shop.fulfill(world.alice.token, first)
        await eventually(
            lambda: _row_matching(engine, lambda row: row.claim_token is not None),
            what="the deliverer to be stuck sending the first receipt",
        )
        # Three purchases of bob's: a buyer registered for a course cannot buy it again.
        for course in ("python-basics", "sql-fundamentals", *more):
            purchase_id = await shop.buy(world.bob.token, course)
            started = time.perf_counter()
            answer = await shop.fulfill(world.bob.token, purchase_id)
            assert time.perf_counter() - started < 1.0
            assert answer["purchase"]["state"] == "fulfilled"
    finally:
        listener.close()  # resets the waiting connections: the send fails, shutdown is quick
    rows = await eventually(
        lambda: _all_rows_if(engine, lambda rows: rows[0].last_error is not None),
        what="the stuck send to fail",
    )
    assert len(rows) == 4
    assert {row.status for row in rows} == {"pending"}


async def test_rejected_recipient_in_serve_is_dead_with_the_servers_answer(
    open_shop: OpenShop, smtp: SmtpServer, world: World, engine: AsyncEngine
) -> None:
    smtp.reject(ALICE)
    shop = await open_shop(smtp.url)
    purchase_id = await shop.buy(world.alice.token)
    await shop.fulfill(world.alice.token, purchase_id)
    row = await eventually(lambda: _row_with_status(engine, "dead"), what="a dead row")
    assert row.last_error is not None
    assert "550" in row.last_error and "no such user" in row.last_error
    await asyncio.sleep(0.5)  # five polls later: not retried
    assert (await only_row(engine)).attempts == 1
    assert smtp.rcpt_attempts == [ALICE]
    assert smtp.received == []


# --- the deliverer, pass by pass ---------------------------------------------------------


async def test_rejected_recipient_is_dead_and_the_rest_of_the_batch_is_sent(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    smtp.reject(ALICE)
    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)
    await fulfilled_purchase(uow_factory, world.alice.actor)
    bobs = await fulfilled_purchase(uow_factory, world.bob.actor, "sql-fundamentals")

    assert await deliverer.deliver_due() == 2
    alice_row, bob_row = await outbox_rows(engine)
    assert (alice_row.status, alice_row.attempts) == ("dead", 1)
    assert alice_row.last_error == "recipient refused: 550 5.1.1 no such user"
    assert (bob_row.status, bob_row.attempts, bob_row.last_error) == ("sent", 1, None)
    [received] = smtp.received
    assert received.rcpt_tos == (BOB,)
    assert_is_receipt(
        received.message, settings=settings, purchase_id=bobs, recipient=BOB,
        title="SQL Fundamentals", amount="39.50 EUR",
    )  # fmt: skip

    for _ in range(3):
        await asyncio.sleep(0.1)
        assert await deliverer.deliver_due() == 0
    assert smtp.rcpt_attempts.count(ALICE) == 1
    assert (await outbox_rows(engine))[0].attempts == 1


async def test_temporary_failure_backs_off_then_delivers_once(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    smtp.fail_data(2)
    retry = {"mail_retry_base": 0.4, "mail_retry_cap": 0.4}
    deliverer = build_deliverer(fast(settings, smtp.url, **retry), uow_factory)
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)

    before = datetime.now(UTC)
    assert await deliverer.deliver_due() == 1
    after = datetime.now(UTC)
    row = await only_row(engine)
    assert (row.status, row.attempts, row.claim_token) == ("pending", 1, None)
    assert row.last_error is not None and "451" in row.last_error
    # Backoff after the first failure: base 0.4 s with equal jitter, so 0.2 to 0.4 s.
    assert before + timedelta(seconds=0.2) <= row.next_attempt_at
    assert row.next_attempt_at <= after + timedelta(seconds=0.4)
    assert await deliverer.deliver_due() == 0, "not due again before its backoff"

    async def delivered() -> OutboxRow | None:
        await deliverer.deliver_due()
        return await _row_with_status(engine, "sent")

    row = await eventually(delivered, what="delivery after the server recovers")
    assert row.attempts == 3
    [received] = smtp.received
    assert received.message["Message-ID"] == message_id_for(purchase_id, settings.mail_from)


async def test_message_is_dead_after_max_attempts_and_keeps_its_last_error(
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    closed = f"smtp://{HOST}:{free_port()}"
    deliverer = build_deliverer(fast(settings, closed, mail_max_attempts=3), uow_factory)
    await fulfilled_purchase(uow_factory, world.alice.actor)

    async def dead() -> OutboxRow | None:
        await deliverer.deliver_due()
        return await _row_with_status(engine, "dead")

    row = await eventually(dead, what="the message to die")
    assert row.attempts == 3
    assert row.last_error is not None and row.last_error.startswith("SMTP server unreachable")
    await asyncio.sleep(0.25)
    assert await deliverer.deliver_due() == 0
    assert (await only_row(engine)).attempts == 3


async def test_requeued_dead_message_is_delivered(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    smtp.reject(ALICE)
    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)
    await deliverer.deliver_due()
    dead = await only_row(engine)
    assert dead.status == "dead"

    smtp.accept(ALICE)  # the operator fixed the mailbox
    async with uow_factory(write=True) as uow:
        assert await uow.receipts.requeue(dead.outbox_id, now=services.utcnow())
        await uow.commit()
    requeued = await only_row(engine)
    assert (requeued.status, requeued.attempts) == ("pending", 0)
    async with uow_factory(write=True) as uow:
        assert not await uow.receipts.requeue(dead.outbox_id, now=services.utcnow())

    assert await deliverer.deliver_due() == 1
    row = await only_row(engine)
    assert (row.status, row.attempts) == ("sent", 1)
    [received] = smtp.received
    assert received.message["Message-ID"] == message_id_for(purchase_id, settings.mail_from)


async def test_claim_of_a_crashed_deliverer_is_sent_once_its_lease_runs_out(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)
    now = services.utcnow()
    async with uow_factory(write=True) as uow:  # a deliverer claims, then dies
        [job] = await uow.receipts.claim_due(
            now=now, lease_until=now + timedelta(seconds=0.3), token="crashed", limit=10
        )
        await uow.commit()
    assert job.receipt.purchase_id == purchase_id

    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)
    assert await deliverer.deliver_due() == 0, "leased to the crashed deliverer"
    await asyncio.sleep(0.35)
    assert await deliverer.deliver_due() == 1
    [received] = smtp.received
    assert received.message["Message-ID"] == message_id_for(purchase_id, settings.mail_from)
    row = await only_row(engine)
    assert (row.status, row.attempts) == ("sent", 2)

    async with uow_factory(write=True) as uow:  # the dead one's claim counts no more
        settled = await uow.receipts.settle(
            job.outbox_id, token="crashed", status=OutboxStatus.PENDING, now=services.utcnow(),
            error="late",
        )  # fmt: skip
        await uow.commit()
    assert not settled
    assert (await only_row(engine)).status == "sent"


async def test_deliverer_that_died_after_sending_causes_a_duplicate_with_the_same_id(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """At worst a receipt is sent twice, with one Message-ID; it is never lost."""
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor)
    now = services.utcnow()
    async with uow_factory(write=True) as uow:
        [job] = await uow.receipts.claim_due(
            now=now, lease_until=now + timedelta(seconds=0.3), token="crashed", limit=10
        )
        await uow.commit()
    # It sends, and dies before recording the outcome.
    dying = SmtpMailer.from_url(smtp.url)
    await dying.send(build_receipt(job.receipt, mail_from=settings.mail_from))
    await dying.close()

    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)
    await asyncio.sleep(0.35)
    assert await deliverer.deliver_due() == 1
    first, second = smtp.received
    expected = message_id_for(purchase_id, settings.mail_from)
    assert first.message["Message-ID"] == second.message["Message-ID"] == expected
    assert (await only_row(engine)).status == "sent"


# --- TLS and credentials ------------------------------------------------------------
# Credentials go only over an encrypted connection; smtp:// upgrades with STARTTLS
# whenever the server offers it, verifying the server's certificate.

LOGIN = ("shop", "p@ss:w/rd")
LOGIN_IN_URL = "shop:p%40ss%3Aw%2Frd"


@pytest.fixture
def local_ca(tmp_path: Path) -> LocalCa:
    return LocalCa.create(tmp_path)


@pytest.fixture
def smtp_with_login() -> Iterator[SmtpServer]:
    """Offers AUTH in plain text, and no STARTTLS."""
    server = SmtpServer(credentials=LOGIN)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def smtp_with_starttls(local_ca: LocalCa) -> Iterator[SmtpServer]:
    """Offers STARTTLS (a certificate of ``local_ca``), and AUTH only after it."""
    server = SmtpServer(credentials=LOGIN, tls=local_ca)
    server.start()
    yield server
    server.stop()


def _with_ca(url: str, ca: LocalCa) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}cafile={ca.ca_file}"


async def _deliver_once(
    url: str, settings: Settings, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    deliverer = build_deliverer(fast(settings, url), uow_factory)
    await fulfilled_purchase(uow_factory, world.alice.actor)
    assert await deliverer.deliver_due() == 1


async def test_credentials_go_over_starttls(
    smtp_with_starttls: SmtpServer,
    local_ca: LocalCa,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """No ?starttls=1 needed: the server offers STARTTLS, so the connection is upgraded
    (the certificate verified against ?cafile=) before the login."""
    url = _with_ca(f"smtp://{LOGIN_IN_URL}@{HOST}:{smtp_with_starttls.port}", local_ca)
    await _deliver_once(url, settings, uow_factory, world)
    [received] = smtp_with_starttls.received
    assert (received.login, received.encrypted) == ("shop", True)
    assert smtp_with_starttls.auth_attempts == [AuthAttempt("shop", encrypted=True)]
    assert (await only_row(engine)).status == "sent"


async def test_without_credentials_the_connection_is_upgraded_when_offered(
    smtp_with_starttls: SmtpServer,
    local_ca: LocalCa,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
) -> None:
    await _deliver_once(
        _with_ca(f"smtp://{HOST}:{smtp_with_starttls.port}", local_ca),
        settings, uow_factory, world,
    )  # fmt: skip
    [received] = smtp_with_starttls.received
    assert (received.login, received.encrypted) == (None, True)


async def test_credentials_are_never_sent_to_a_server_without_starttls(
    smtp_with_login: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """The server would take AUTH in plain text: the deliverer refuses to send it, and
    keeps the receipt pending (an operator's fix away, like a wrong password)."""
    url = f"smtp://{LOGIN_IN_URL}@{HOST}:{smtp_with_login.port}"
    await _deliver_once(url, settings, uow_factory, world)
    assert smtp_with_login.auth_attempts == []
    assert smtp_with_login.received == []
    row = await only_row(engine)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error == NO_TLS_FOR_CREDENTIALS


async def test_starttls_1_requires_it(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    await _deliver_once(f"{smtp.url}?starttls=1", settings, uow_factory, world)
    assert smtp.received == []
    row = await only_row(engine)
    assert (row.status, row.last_error) == ("pending", NO_STARTTLS)


async def test_plain_text_without_credentials_when_no_starttls_is_offered_or_with_starttls_0(
    smtp: SmtpServer,
    smtp_with_starttls: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
) -> None:
    await _deliver_once(smtp.url, settings, uow_factory, world)
    [received] = smtp.received
    assert (received.login, received.encrypted) == (None, False)

    # ?starttls=0: plain text even where STARTTLS is offered (no certificate needed).
    deliverer = build_deliverer(
        fast(settings, f"smtp://{HOST}:{smtp_with_starttls.port}?starttls=0"), uow_factory
    )
    await fulfilled_purchase(uow_factory, world.bob.actor)
    assert await deliverer.deliver_due() == 1
    [received] = smtp_with_starttls.received
    assert (received.login, received.encrypted) == (None, False)


async def test_an_untrusted_certificate_is_refused_before_anything_is_sent(
    smtp_with_starttls: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """Without ?cafile= the test CA is not trusted: no login, no message, a clear error."""
    url = f"smtp://{LOGIN_IN_URL}@{HOST}:{smtp_with_starttls.port}"
    await _deliver_once(url, settings, uow_factory, world)
    assert smtp_with_starttls.auth_attempts == []
    assert smtp_with_starttls.received == []
    row = await only_row(engine)
    assert row.status == "pending"
    assert row.last_error is not None
    assert row.last_error.startswith("TLS with the SMTP server failed (")
    assert "certificate" in row.last_error and "?cafile=" in row.last_error


async def test_wrong_password_is_retried_not_dead(
    smtp_with_starttls: SmtpServer,
    local_ca: LocalCa,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """Wrong credentials are the operator's to fix; receipts wait meanwhile."""
    url = _with_ca(f"smtp://shop:wrong@{HOST}:{smtp_with_starttls.port}", local_ca)
    await _deliver_once(url, settings, uow_factory, world)
    row = await only_row(engine)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None and "535" in row.last_error
    assert smtp_with_starttls.received == []


class GatedMailer:
    """Holds the first send until ``gate`` opens, then hands every message to ``inner``."""

    def __init__(self, inner: SmtpMailer):
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def send(self, message: EmailMessage) -> None:
        if not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        await self.inner.send(message)

    async def close(self) -> None:
        await self.inner.close()


async def test_stop_during_a_send_finishes_it_returns_promptly_and_releases_the_rest(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    for course in ("python-basics", "sql-fundamentals", *await more_courses(uow_factory, 1)):
        await fulfilled_purchase(uow_factory, world.alice.actor, course)
    mailer = GatedMailer(SmtpMailer.from_url(smtp.url))
    deliverer = ReceiptDeliverer(  # one message at a time: the others wait to be released
        uow_factory, mailer, mail_from=settings.mail_from, poll_seconds=30.0, concurrency=1
    )
    task = asyncio.create_task(deliverer.run())
    try:
        await asyncio.wait_for(mailer.entered.wait(), 5.0)
        deliverer.stop()
        mailer.gate.set()
        await asyncio.wait_for(task, 1.0)
    finally:
        task.cancel()

    assert len(smtp.received) == 1, "the message being sent is finished"
    first, *rest = await outbox_rows(engine)
    assert (first.status, first.attempts) == ("sent", 1)
    now = services.utcnow()
    for row in rest:  # given back as if never claimed
        assert (row.status, row.attempts, row.claim_token) == ("pending", 0, None)
        assert row.next_attempt_at <= now

    again = build_deliverer(fast(settings, smtp.url), uow_factory)
    assert await again.deliver_due() == 2
    assert len(smtp.received) == 3
    assert {row.status for row in await outbox_rows(engine)} == {"sent"}


async def test_stop_while_idle_returns_at_once(
    smtp: SmtpServer, settings: Settings, uow_factory: SqlUnitOfWorkFactory
) -> None:
    deliverer = build_deliverer(fast(settings, smtp.url, mail_poll_interval=30.0), uow_factory)
    task = asyncio.create_task(deliverer.run())
    await asyncio.sleep(0.1)
    deliverer.stop()
    await asyncio.wait_for(task, 0.5)


async def test_app_deliverer_stops_with_the_app(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    smtp: SmtpServer,
    settings: Settings,
) -> None:
    """Shutting the app down wakes its idle deliverer (30 s poll) and waits for it."""
    app = create_app(fast(settings, smtp.url, mail_poll_interval=30.0))
    client = await aiohttp_client(app)
    assert isinstance(app[DELIVERER], ReceiptDeliverer)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 1.0


async def test_receipt_that_cannot_be_built_is_dead_and_does_not_block_the_batch(
    smtp: SmtpServer,
    world: World,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    """A course title with a line break (``create-course --title`` accepts one) cannot
    be a Subject header: ``build_receipt`` raises ValueError. That receipt can never
    be sent, so it must end dead with the reason, and the next receipt must still go.

    BUG: ``ReceiptDeliverer._deliver`` calls ``build_receipt`` outside its try block, so
    the error escapes ``deliver_due``: the row is never settled (no last_error, never
    dead, re-claimed after every lease with attempts growing past max_attempts) and the
    rest of its batch waits out the lease too.
    """
    await services.save_course(
        uow_factory, slug="broken", title="Python\nBasics", price=Decimal("10.00"),
        currency="USD",
    )  # fmt: skip
    await fulfilled_purchase(uow_factory, world.alice.actor, "broken")
    await fulfilled_purchase(uow_factory, world.bob.actor, "python-basics")
    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)

    assert await deliverer.deliver_all() == 2
    broken, fine = await outbox_rows(engine)
    assert broken.status == "dead" and broken.last_error
    assert fine.status == "sent"
    [received] = smtp.received
    assert received.rcpt_tos == (BOB,)


# --- helpers ------------------------------------------------------------------------------


async def _row_matching(
    engine: AsyncEngine, predicate: Callable[[OutboxRow], bool]
) -> OutboxRow | None:
    rows = await outbox_rows(engine)
    return rows[0] if len(rows) == 1 and predicate(rows[0]) else None


async def _row_with_status(engine: AsyncEngine, status: str) -> OutboxRow | None:
    return await _row_matching(engine, lambda row: row.status == status)


async def _all_rows_if(
    engine: AsyncEngine, predicate: Callable[[list[OutboxRow]], bool]
) -> list[OutboxRow] | None:
    rows = await outbox_rows(engine)
    return rows if rows and predicate(rows) else None


async def test_a_non_ascii_receipt_reaches_the_mail_server_intact(
    smtp: SmtpServer, world: World, settings: Settings, uow_factory: SqlUnitOfWorkFactory
) -> None:
    """The receipt's text goes out encoded (encoded-word Subject, quoted-printable
    parts) and the server reads back exactly the title the shop stored."""
    title = "Pythön für Anfänger ✓ <&> 🐍"
    await services.save_course(
        uow_factory, slug="unicode", title=title, price=Decimal("10.00"), currency="EUR"
    )
    purchase_id = await fulfilled_purchase(uow_factory, world.alice.actor, "unicode")
    deliverer = build_deliverer(fast(settings, smtp.url), uow_factory)
    assert await deliverer.deliver_all() == 1
    [received] = smtp.received
    message = received.message
    assert received.rcpt_tos == (ALICE,)
    assert message["Subject"] == f"Your receipt: {title}"
    assert message["Message-ID"] == message_id_for(purchase_id, settings.mail_from)
    plain = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert plain is not None and html_part is not None
    assert f"Course:      {title}\n" in plain.get_content().replace("\r\n", "\n")
    assert "Pythön für Anfänger ✓ &lt;&amp;&gt; 🐍" in html_part.get_content()


RECEIPT_CASES = [
    ("Python Basics", "Course Shop <receipts@shop.example>"),
    ("Café ✓ — « résumé »", "receipts@shop.example"),  # encoded Subject, quoted-printable
    ("A rather long course title " * 4, "Shop <receipts@shop.example>"),  # folded Subject
    ("From the start\tto the end <&>", '"Shop, Inc." <receipts@shop.example>'),
    # A quoted-printable line that starts with "From " (a multipart's text is not
    # "From "-mangled: the same either way).
    ("é" + "x" * 36 + " From here", "receipts@shop.example"),
]


@pytest.mark.parametrize(("title", "mail_from"), RECEIPT_CASES)
@pytest.mark.parametrize("starttls", ["", "?starttls=0"])  # greeted at connect, or not
async def test_a_receipt_reaches_the_server_as_send_message_would_send_it(
    smtp: SmtpServer, title: str, mail_from: str, starttls: str
) -> None:
    """The mailer writes a receipt out itself with the receipt's policy and hands it to
    ``sendmail`` (rather than ``send_message``, which refolds every header with
    compat32): the server gets the same envelope, options and bytes either way."""
    receipt = Receipt(
        purchase_id="0123456789abcdef",
        recipient=ALICE,
        course_title=title,
        amount=Decimal("49.5"),
        currency="EUR",
        fulfilled_at=datetime(2026, 12, 4, 19, 30, tzinfo=UTC),
    )
    message = build_receipt(receipt, mail_from=mail_from)
    assert _plain_envelope(message) is not None  # the mailer's own path is taken
    mailer = SmtpMailer.from_url(f"{smtp.url}{starttls}")
    await mailer.send(message)
    await mailer.close()
    reference = aiosmtplib.SMTP(hostname=HOST, port=smtp.port, start_tls=False)
    async with reference:
        await reference.send_message(message)
    ours, theirs = smtp.received
    assert ours.content == theirs.content
    assert (ours.mail_from, ours.rcpt_tos, ours.mail_options) == (
        theirs.mail_from,
        theirs.rcpt_tos,
        theirs.mail_options,
    )
    assert ours.rcpt_tos == (ALICE,)
    assert ours.message["Subject"] == f"Your receipt: {title}"
    if "From here" in title:
        assert b"\nFrom here" in ours.content


def test_messages_the_mailer_leaves_to_send_message() -> None:
    """What ``send_message`` would read another envelope from, or write differently."""
    receipt = build_receipt(
        Receipt("p1", ALICE, "T", Decimal("1"), "EUR", datetime(2026, 1, 1, tzinfo=UTC)),
        mail_from="shop@example.com",
    )
    assert _plain_envelope(receipt) == ("shop@example.com", [ALICE])
    for name, value in [
        ("Bcc", BOB),
        ("Sender", "other@example.com"),
        ("Resent-Date", "Fri, 04 Dec 2026 19:30:00 +0000"),
    ]:
        extra = copy.deepcopy(receipt)
        extra[name] = value
        assert _plain_envelope(extra) is None, name
    with_cc = copy.deepcopy(receipt)
    with_cc["Cc"] = BOB
    assert _plain_envelope(with_cc) == ("shop@example.com", [ALICE, BOB])
    unicode_recipient = copy.deepcopy(receipt)
    unicode_recipient.replace_header("To", "jörg@example.com")
    assert _plain_envelope(unicode_recipient) is None
    modern = EmailMessage()
    modern["From"], modern["To"] = "shop@example.com", ALICE
    assert _plain_envelope(modern) is None
