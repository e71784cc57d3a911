"""The deliverer claims more at once while a backlog lasts (``ReceiptDeliverer``'s
``batch_size`` and ``max_claim``): fewer write transactions per receipt when receipts
queue faster than claims of ``batch_size`` take them, and back to ``batch_size`` as soon
as a claim finds fewer than it asked for."""

from __future__ import annotations

from pathlib import Path

from rpc_server.domain.outbox import OutboxStatus
from rpc_server.mail.deliverer import ReceiptDeliverer
from rpc_server.mail.mailer import FileMailer
from tests.unit.conftest import FakeWorld
from tests.unit.fakes import FixedClock


async def queue_receipts(fake: FakeWorld, clock: FixedClock, numbers: range) -> None:
    async with fake.uow(write=True) as uow:
        for number in numbers:
            purchase = await uow.purchases.add(
                purchase_id=f"p{number}", owner_id=fake.alice.user_id, course=fake.python,
                idempotency_key=None, now=clock(),
            )  # fmt: skip
            assert purchase is not None
            await uow.receipts.add(purchase, now=clock())
        await uow.commit()


async def test_claims_double_while_full_and_start_over_once_caught_up(
    fake: FakeWorld, clock: FixedClock, tmp_path: Path
) -> None:
    await queue_receipts(fake, clock, range(125))
    deliverer = ReceiptDeliverer(
        fake.uow, FileMailer(tmp_path), mail_from="shop@example.com",
        batch_size=10, max_claim=40, clock=clock,
    )  # fmt: skip
    handled = [await deliverer.deliver_due() for _ in range(6)]
    # 10 (full: next 20), 20 (full: next 40), 40, 40 (at most max_claim), then the 15
    # left of a claim of 40: not full, so the next claim is of 10 again.
    assert handled == [10, 20, 40, 40, 15, 0]
    await queue_receipts(fake, clock, range(125, 140))
    assert await deliverer.deliver_due() == 10
    assert await deliverer.deliver_due() == 5
    # Every receipt was sent, and recorded as sent.
    assert len(fake.uow.receipts) == 140
    assert {row.status for row in fake.uow.receipts} == {OutboxStatus.SENT}
