"""registration.list's pages, in the service (with fakes): newest first, own only."""

from __future__ import annotations

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, Registration
from rpc_server.domain.states import PurchaseState
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.conftest import FRONTEND_URL, FakeWorld
from tests.unit.fakes import FixedClock
from tests.unit.proofs import paid


async def register(fake: FakeWorld, actor: Actor, count: int, clock: FixedClock) -> list[str]:
    """Buy and pay for ``count`` new courses as ``actor``; return the purchase ids."""
    purchase_ids = []
    for n in range(count):
        slug = f"{actor.email.partition('@')[0]}-{n}"
        fake.uow.add_course(slug, slug, "10.00")
        purchase = await services.create_purchase(fake.uow, actor, course=slug)
        clock.advance()
        await services.fulfill_purchase(
            fake.uow, actor, FrontendLinks(FRONTEND_URL), purchase_id=purchase.purchase_id,
            purchase_state=PurchaseState.FULFILLED, payment_proof=paid(purchase, clock),
            verifier=PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp),
            clock=clock,
        )  # fmt: skip
        purchase_ids.append(purchase.purchase_id)
    return purchase_ids


async def all_pages(fake: FakeWorld, actor: Actor, limit: int) -> list[list[Registration]]:
    pages, cursor = [], None
    while True:
        page = await services.list_registrations(fake.uow, actor, limit=limit, cursor=cursor)
        pages.append(page.items)
        if page.next_before is None:
            return pages
        cursor = page.next_before


async def test_pages_walk_every_registration_once_newest_first(
    fake: FakeWorld, clock: FixedClock
) -> None:
    alices = await register(fake, fake.alice, 5, clock)
    await register(fake, fake.bob, 2, clock)

    pages = await all_pages(fake, fake.alice, limit=2)

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [r.purchase_id for page in pages for r in page] == alices[::-1]


async def test_an_exact_last_page_has_no_next_cursor(fake: FakeWorld, clock: FixedClock) -> None:
    await register(fake, fake.alice, 4, clock)
    assert [len(page) for page in await all_pages(fake, fake.alice, limit=2)] == [2, 2]
    assert [len(page) for page in await all_pages(fake, fake.alice, limit=4)] == [4]


async def test_no_registrations_is_one_empty_page(fake: FakeWorld) -> None:
    page = await services.list_registrations(fake.uow, fake.alice)
    assert (page.items, page.next_before) == ([], None)
