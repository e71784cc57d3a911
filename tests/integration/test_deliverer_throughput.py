"""The deliverer keeps up: several receipts in flight, SMTP connections kept open between
messages, and a claim's lease renewed while its sends go on (so the lease can be short).

Against a real SMTP server (aiosmtpd) whose DATA can be made slow, and the real outbox.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.mail.deliverer import build_deliverer
from rpc_server.mail.mailer import SmtpMailer
from rpc_server.mail.receipts import Receipt, build_receipt
from tests.conftest import World
from tests.integration.smtp_server import (
    RecordingHandler,
    SmtpServer,
    eventually,
    fulfilled_purchase,
    more_courses,
    outbox_rows,
)

RECEIPTS = 24
CONCURRENCY = 4


class SlowHandler(RecordingHandler):
    """Holds each DATA ``delay`` seconds; records which connection (client address and
    port) delivered each message and the most DATA commands in progress at once."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.peers: list[Any] = []
        self.most_at_once = 0
        self._in_data = 0
        self._count_lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._count_lock:
            self.peers.append(session.peer)
            self._in_data += 1
            self.most_at_once = max(self.most_at_once, self._in_data)
        try:
            await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        finally:
            with self._count_lock:
                self._in_data -= 1


@pytest.fixture
def slow_smtp() -> Iterator[tuple[SmtpServer, SlowHandler]]:
    server = SmtpServer()
    handler = SlowHandler(delay=0.2)
    server.handler = handler
    server.start()
    yield server, handler
    server.stop()


def sending_to(settings: Settings, smtp: SmtpServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"smtp_url": smtp.url, "mail_poll_interval": 0.1}
    return replace(settings, **(values | overrides))


# 12: more than SmtpMailer keeps open by default (8): every connection of a claim must
# stay open for the next claim.
@pytest.mark.parametrize("concurrency", [CONCURRENCY, 12])
async def test_receipts_go_out_several_at_a_time_on_connections_kept_open(
    concurrency: int,
    slow_smtp: tuple[SmtpServer, SlowHandler],
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
    world: World,
) -> None:
    smtp, handler = slow_smtp
    courses = ["python-basics", "sql-fundamentals", *await more_courses(uow_factory, RECEIPTS - 2)]
    for course in courses:
        await fulfilled_purchase(uow_factory, world.alice.actor, course)
    deliverer = build_deliverer(
        sending_to(settings, smtp, mail_concurrency=concurrency), uow_factory
    )
    deliverer.batch_size = concurrency  # several claims in a row, as under load
    running = asyncio.create_task(deliverer.run())

    async def all_sent() -> bool:
        return {row.status for row in await outbox_rows(engine)} == {"sent"}

    try:
        await eventually(all_sent, what="every receipt sent")
    finally:
        deliverer.stop()
        await running

    assert {row.status for row in await outbox_rows(engine)} == {"sent"}
    ids = Counter(str(r.message["Message-ID"]) for r in smtp.handler.received)
    assert len(ids) == RECEIPTS and set(ids.values()) == {1}, "each receipt once"
    assert handler.most_at_once == concurrency, "as many in flight as allowed, no more"
    # Each connection carried several messages, across claims: no more connections than
    # sends in flight.
    assert len(set(handler.peers)) == concurrency


async def test_a_connection_the_server_dropped_while_idle_is_replaced(
    smtp_server: SmtpServer,
) -> None:
    mailer = SmtpMailer.from_url(smtp_server.url)
    try:
        await mailer.send(receipt(1))
        smtp_server.stop()  # drops every connection, the idle one included
        smtp_server.start()
        await mailer.send(receipt(2))
    finally:
        await mailer.close()
    assert [str(r.message["Subject"]) for r in smtp_server.received] == [
        "Your receipt: Course 1",
        "Your receipt: Course 2",
    ]


async def test_a_send_that_outlasts_the_lease_keeps_its_claim(
    slow_smtp: tuple[SmtpServer, SlowHandler],
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
    world: World,
) -> None:
    """Lease 0.3 s, a send of 1.2 s: renewed every 0.1 s, the claim is never taken by the
    other deliverer polling meanwhile, and the receipt goes out once."""
    smtp, handler = slow_smtp
    handler.delay = 1.2
    await fulfilled_purchase(uow_factory, world.alice.actor)
    fast_lease = sending_to(settings, smtp, mail_lease=0.3)
    sender, other = (
        build_deliverer(fast_lease, uow_factory),
        build_deliverer(fast_lease, uow_factory),
    )

    sending = asyncio.create_task(sender.deliver_due())
    started = time.monotonic()

    async def being_sent() -> bool:
        return bool(handler.peers)

    await eventually(being_sent, what="the receipt claimed and being sent")
    taken_by_other = 0
    while not sending.done():
        taken_by_other += await other.deliver_due()
        await asyncio.sleep(0.05)
    assert await sending == 1
    assert time.monotonic() - started > 1.0, "the send did outlast the lease"
    assert taken_by_other == 0
    [row] = await outbox_rows(engine)
    assert (row.status, row.attempts) == ("sent", 1)
    assert len(smtp.handler.received) == 1


async def test_without_renewal_the_short_lease_would_have_run_out(
    slow_smtp: tuple[SmtpServer, SlowHandler],
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
    world: World,
) -> None:
    """The control of the test above: a deliverer that stops renewing (it died, here:
    its renewal never runs) loses the claim after the lease, and another sends it."""
    smtp, _ = slow_smtp
    await fulfilled_purchase(uow_factory, world.alice.actor)
    fast_lease = sending_to(settings, smtp, mail_lease=0.3)
    dead = build_deliverer(fast_lease, uow_factory)
    async with uow_factory(write=True) as uow:  # what the dead one claimed, then nothing
        now = dead.clock()
        assert await uow.receipts.claim_due(
            now=now, lease_until=now + dead.lease, token="dead", limit=10
        )
        await uow.commit()
    other = build_deliverer(fast_lease, uow_factory)
    assert await other.deliver_due() == 0, "still leased"
    await asyncio.sleep(0.35)
    assert await other.deliver_due() == 1
    [row] = await outbox_rows(engine)
    assert (row.status, row.attempts) == ("sent", 2)


def receipt(n: int) -> EmailMessage:
    return build_receipt(
        Receipt(
            purchase_id=f"p{n}",
            recipient="alice@example.com",
            course_title=f"Course {n}",
            amount=Decimal("10.00"),
            currency="USD",
            fulfilled_at=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        mail_from="shop@example.com",
    )


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()
