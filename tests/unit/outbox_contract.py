"""What the receipt outbox port (``ports.ReceiptOutboxRepository``) promises, as checks
that run on any ``UnitOfWorkFactory``.

``tests/unit/test_outbox_port.py`` runs them on the in-memory fake and
``tests/integration/test_outbox_port_sql.py`` on the SQL repository (SQLite and
PostgreSQL): the fake the deliverer's unit tests rely on behaves as the real one does.

Receipts are queued the way the server queues them, by fulfilling purchases (as the
payment backend, which needs no proof), at times the checks choose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.outbox import OutboxEntry, OutboxStatus, ReceiptJob
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import Actor
from rpc_server.domain.states import PurchaseState
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.fakes import FixedClock

PENDING, SENT, DEAD = OutboxStatus.PENDING, OutboxStatus.SENT, OutboxStatus.DEAD
T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class OutboxWorld:
    """A database with two buyers, the payment backend and the two courses
    ``python-basics`` (Python Basics, 49.00 USD) and ``sql-fundamentals``."""

    uow_factory: UnitOfWorkFactory
    alice: Actor
    bob: Actor
    payments: Actor


async def queue_receipts(world: OutboxWorld, *times: datetime) -> list[str]:
    """Fulfil one purchase per time (its receipt is due then); return their ids."""
    buys = [
        (world.alice, "python-basics"),
        (world.alice, "sql-fundamentals"),
        (world.bob, "python-basics"),
        (world.bob, "sql-fundamentals"),
    ]
    assert len(times) <= len(buys)
    verifier = PaymentSignatures((TEST_PAYMENT_KEY,))
    purchase_ids = []
    for (buyer, course), moment in zip(buys, times, strict=False):
        clock = FixedClock(moment)
        purchase = await services.create_purchase(
            world.uow_factory, buyer, course=course, clock=clock
        )
        await services.fulfill_purchase(
            world.uow_factory, world.payments, FrontendLinks("https://shop.example"),
            purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
            verifier=verifier, clock=clock,
        )  # fmt: skip
        purchase_ids.append(purchase.purchase_id)
    return purchase_ids


async def entries(world: OutboxWorld) -> dict[str, OutboxEntry]:
    """Every message by purchase id."""
    async with world.uow_factory() as uow:
        return {e.purchase_id: e for e in await uow.receipts.overview(limit=100)}


async def claim(world: OutboxWorld, now: datetime, token: str, limit: int = 10) -> list[ReceiptJob]:
    async with world.uow_factory(write=True) as uow:
        jobs = await uow.receipts.claim_due(
            now=now, lease_until=now + LEASE, token=token, limit=limit
        )
        await uow.commit()
    return jobs


def claimed(jobs: Sequence[ReceiptJob]) -> list[tuple[str, int]]:
    return [(job.receipt.purchase_id, job.attempts) for job in jobs]


async def settle(
    world: OutboxWorld,
    job: ReceiptJob,
    token: str,
    status: OutboxStatus,
    now: datetime,
    next_attempt_at: datetime | None = None,
    error: str | None = None,
) -> bool:
    async with world.uow_factory(write=True) as uow:
        settled = await uow.receipts.settle(
            job.outbox_id, token=token, status=status, now=now,
            next_attempt_at=next_attempt_at, error=error,
        )  # fmt: skip
        await uow.commit()
    return settled


async def added_receipts_are_pending_and_due_at_once(world: OutboxWorld) -> None:
    first, second = await queue_receipts(world, at(0), at(10))
    found = await entries(world)
    assert [
        (e.purchase_id, e.recipient, e.status, e.attempts, e.next_attempt_at, e.sent_at)
        for e in found.values()
    ] == [
        (second, "alice@example.com", PENDING, 0, at(10), None),  # newest first
        (first, "alice@example.com", PENDING, 0, at(0), None),
    ]
    async with world.uow_factory() as uow:
        assert await uow.receipts.counts() == {PENDING: 2}
        [newest] = await uow.receipts.overview(limit=1)
        assert newest.purchase_id == second
        assert await uow.receipts.status_of(newest.outbox_id) is PENDING
        assert await uow.receipts.status_of(newest.outbox_id + 1000) is None


async def a_claim_takes_due_messages_oldest_first_and_leases_them(world: OutboxWorld) -> None:
    first, second, third = await queue_receipts(world, at(0), at(1), at(2))
    jobs = await claim(world, at(1), "a")
    assert claimed(jobs) == [(first, 1), (second, 1)]  # the third is not due yet
    receipt = jobs[0].receipt
    assert (receipt.recipient, receipt.course_title, receipt.currency) == (
        "alice@example.com", "Python Basics", "USD",
    )  # fmt: skip
    assert (receipt.amount, receipt.fulfilled_at) == (Decimal("49.00"), at(0))
    assert await claim(world, at(1), "b") == [], "leased to claim a"
    assert claimed(await claim(world, at(2), "b")) == [(third, 1)]
    found = await entries(world)
    assert found[first].next_attempt_at == at(1) + LEASE
    # The lease ran out (its deliverer died): due again, one more attempt counted; a
    # claim takes the message due first.
    assert claimed(await claim(world, at(1) + LEASE, "c", limit=1)) == [(first, 2)]


async def settling_records_the_outcome_only_under_the_current_claim(world: OutboxWorld) -> None:
    sent, retried, dead = await queue_receipts(world, at(0), at(0), at(0))
    jobs = {job.receipt.purchase_id: job for job in await claim(world, at(0), "t")}
    assert not await settle(world, jobs[sent], "someone-else", SENT, at(1))
    assert (await entries(world))[sent].status is PENDING

    assert await settle(world, jobs[sent], "t", SENT, at(1))
    assert await settle(world, jobs[retried], "t", PENDING, at(1), at(60), error="x" * 3000)
    assert await settle(world, jobs[dead], "t", DEAD, at(1), at(999), error="550 no such user")
    assert not await settle(world, jobs[sent], "t", DEAD, at(2)), "the claim has ended"

    found = await entries(world)
    assert (found[sent].status, found[sent].sent_at, found[sent].last_error) == (SENT, at(1), None)
    assert (found[retried].status, found[retried].next_attempt_at) == (PENDING, at(60))
    assert found[retried].last_error == "x" * 2000
    # Dead: never due again; next_attempt_at records when it died.
    assert (found[dead].status, found[dead].next_attempt_at) == (DEAD, at(1))
    assert found[dead].last_error == "550 no such user"
    async with world.uow_factory() as uow:
        assert await uow.receipts.counts() == {SENT: 1, PENDING: 1, DEAD: 1}

    assert await claim(world, at(59), "u") == []
    [again] = await claim(world, at(60) + timedelta(days=365), "u")
    assert claimed([again]) == [(retried, 2)]
    # No error this time: the last one is kept (mail-status shows it until sent).
    assert await settle(world, again, "u", SENT, at(61))
    assert (await entries(world))[retried].last_error == "x" * 2000


async def settling_sends_together_changes_only_those_still_claimed(world: OutboxWorld) -> None:
    first, second, died, other = await queue_receipts(world, at(0), at(0), at(0), at(1))
    jobs = {job.receipt.purchase_id: job for job in await claim(world, at(0), "t")}
    [theirs] = await claim(world, at(1), "v")
    assert await settle(world, jobs[died], "t", DEAD, at(1), error="550 no such user")
    ids = [jobs[first].outbox_id, jobs[second].outbox_id, jobs[died].outbox_id]
    async with world.uow_factory(write=True) as uow:
        assert await uow.receipts.settle_sent([], token="t", now=at(2)) == set()
        settled = await uow.receipts.settle_sent([*ids, theirs.outbox_id], token="t", now=at(2))
        await uow.commit()
    assert settled == {jobs[first].outbox_id, jobs[second].outbox_id}
    found = await entries(world)
    for sent in (first, second):
        assert (found[sent].status, found[sent].sent_at, found[sent].last_error) == (
            SENT, at(2), None,
        )  # fmt: skip
    assert (found[died].status, found[died].sent_at) == (DEAD, None)
    assert (found[other].status, found[other].sent_at) == (PENDING, None)
    assert await settle(world, theirs, "v", SENT, at(3)), "still claimed by v"


async def releasing_gives_back_claimed_messages_not_attempted(world: OutboxWorld) -> None:
    sent, unsent = await queue_receipts(world, at(0), at(0))
    jobs = {job.receipt.purchase_id: job for job in await claim(world, at(0), "t")}
    assert await settle(world, jobs[sent], "t", SENT, at(1))
    async with world.uow_factory(write=True) as uow:
        await uow.receipts.release("t", now=at(2))
        await uow.commit()
    found = await entries(world)
    assert (found[unsent].status, found[unsent].attempts) == (PENDING, 0)
    assert found[unsent].next_attempt_at == at(2)
    assert (found[sent].status, found[sent].attempts) == (SENT, 1)
    assert claimed(await claim(world, at(2), "u")) == [(unsent, 1)]


async def renewing_extends_only_the_claims_still_held(world: OutboxWorld) -> None:
    sent, held = await queue_receipts(world, at(0), at(0))
    jobs = {job.receipt.purchase_id: job for job in await claim(world, at(0), "t")}
    assert await settle(world, jobs[sent], "t", SENT, at(1))
    async with world.uow_factory(write=True) as uow:
        await uow.receipts.renew("t", lease_until=at(0) + 3 * LEASE)
        await uow.receipts.renew("nobody's", lease_until=at(0) + 9 * LEASE)
        await uow.commit()
    found = await entries(world)
    assert (found[held].status, found[held].next_attempt_at) == (PENDING, at(0) + 3 * LEASE)
    assert (found[sent].status, found[sent].next_attempt_at) == (SENT, at(0) + LEASE)
    assert await claim(world, at(0) + 2 * LEASE, "u") == [], "still leased to t"
    assert claimed(await claim(world, at(0) + 3 * LEASE, "u")) == [(held, 2)]


async def only_dead_messages_are_requeued(world: OutboxWorld) -> None:
    dead, pending = await queue_receipts(world, at(0), at(0))
    jobs = {job.receipt.purchase_id: job for job in await claim(world, at(0), "t")}
    assert await settle(world, jobs[dead], "t", DEAD, at(1), error="refused")
    outbox_id = jobs[dead].outbox_id
    async with world.uow_factory(write=True) as uow:
        assert not await uow.receipts.requeue(jobs[pending].outbox_id, now=at(5))
        assert not await uow.receipts.requeue(outbox_id + 1000, now=at(5))
        assert await uow.receipts.requeue(outbox_id, now=at(5))
        assert not await uow.receipts.requeue(outbox_id, now=at(5)), "pending now"
        await uow.commit()
    found = (await entries(world))[dead]
    assert (found.status, found.attempts, found.next_attempt_at) == (PENDING, 0, at(5))
    assert claimed(await claim(world, at(5), "u")) == [(dead, 1)]


async def a_status_outside_the_enum_is_refused(world: OutboxWorld) -> None:
    [purchase_id] = await queue_receipts(world, at(0))
    [job] = await claim(world, at(0), "t")
    with pytest.raises(ValueError, match="bogus"):
        await settle(world, job, "t", "bogus", at(1))  # type: ignore[arg-type]
    assert (await entries(world))[purchase_id].status is PENDING


Check = Callable[[OutboxWorld], Awaitable[None]]
CHECKS: list[Check] = [
    added_receipts_are_pending_and_due_at_once,
    a_claim_takes_due_messages_oldest_first_and_leases_them,
    settling_records_the_outcome_only_under_the_current_claim,
    settling_sends_together_changes_only_those_still_claimed,
    releasing_gives_back_claimed_messages_not_attempted,
    renewing_extends_only_the_claims_still_held,
    only_dead_messages_are_requeued,
    a_status_outside_the_enum_is_refused,
]
