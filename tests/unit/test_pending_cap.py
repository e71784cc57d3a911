"""The cap on open (pending) purchases per user, in the purchase service (with fakes)."""

from __future__ import annotations

import pytest

from rpc_server.domain import services
from rpc_server.domain.errors import Conflict, TooManyPendingPurchases
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, Purchase
from rpc_server.domain.states import PurchaseState
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.conftest import FRONTEND_URL, FakeWorld
from tests.unit.fakes import FixedClock
from tests.unit.proofs import paid

CAP = 2


async def create(
    fake: FakeWorld, actor: Actor, course: str, key: str | None = None, cap: int | None = CAP
) -> Purchase:
    return await services.create_purchase(
        fake.uow, actor, course=course, idempotency_key=key, max_pending=cap
    )


async def settle(fake: FakeWorld, purchase: Purchase, state: PurchaseState) -> None:
    clock = FixedClock()
    await services.fulfill_purchase(
        fake.uow,
        fake.alice,
        FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id,
        purchase_state=state,
        payment_proof=paid(purchase, clock) if state is PurchaseState.FULFILLED else None,
        verifier=PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp),
        clock=clock,
    )


def courses(fake: FakeWorld, count: int) -> list[str]:
    slugs = [f"course-{n}" for n in range(count)]
    for slug in slugs:
        fake.uow.add_course(slug, slug.title(), "10.00", "USD")
    return slugs


async def test_past_the_cap_a_clear_conflict_and_nothing_created(fake: FakeWorld) -> None:
    first, second, third = courses(fake, 3)
    await create(fake, fake.alice, first)
    await create(fake, fake.alice, second)
    commits = fake.uow.commits

    with pytest.raises(TooManyPendingPurchases) as raised:
        await create(fake, fake.alice, third)

    assert isinstance(raised.value, Conflict)  # answered as 409
    assert raised.value.data == {"pending": 2, "limit": 2}
    assert "2 open purchases" in raised.value.message
    assert fake.uow.commits == commits
    assert len(fake.uow.committed.purchases) == 2


async def test_an_idempotent_replay_still_answers_at_the_cap(fake: FakeWorld) -> None:
    first, second = courses(fake, 2)
    original = await create(fake, fake.alice, first, key="order-1")
    await create(fake, fake.alice, second)
    assert await create(fake, fake.alice, first, key="order-1") == original


async def test_only_pending_purchases_count(fake: FakeWorld) -> None:
    slugs = courses(fake, 5)
    held = [await create(fake, fake.alice, slug) for slug in slugs[:2]]
    await settle(fake, held[0], PurchaseState.CANCELED)
    third = await create(fake, fake.alice, slugs[2])
    await settle(fake, third, PurchaseState.FULFILLED)
    await create(fake, fake.alice, slugs[3])  # pending: held[1] and this one
    with pytest.raises(TooManyPendingPurchases):
        await create(fake, fake.alice, slugs[4])


async def test_the_cap_is_per_user(fake: FakeWorld) -> None:
    slugs = courses(fake, 3)
    for slug in slugs[:2]:
        await create(fake, fake.alice, slug)
    assert (await create(fake, fake.bob, slugs[2])).owner_id == fake.bob.user_id


async def test_the_user_is_held_before_counting_and_without_a_cap_nothing_is(
    fake: FakeWorld,
) -> None:
    first, second = courses(fake, 2)
    await create(fake, fake.alice, first)
    assert fake.uow.held_users == [fake.alice.user_id]
    for _ in range(3):  # no cap (the CLI's and the demo's purchases): no hold, no limit
        await create(fake, fake.alice, second, key="k", cap=None)
    assert fake.uow.held_users == [fake.alice.user_id]
