"""The domain services, driven through the in-memory fake unit of work."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from rpc_server.domain import services
from rpc_server.domain.errors import (
    Conflict,
    IdempotencyKeyReused,
    InvalidTransition,
    NotFound,
)
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import (
    Actor,
    Backing,
    EventActor,
    Fulfillment,
    Purchase,
    SignedPayment,
    Source,
)
from rpc_server.domain.states import PurchaseState, Scope, Step
from rpc_server.domain.tokens import TOKEN_PREFIX, hash_token
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.conftest import FRONTEND_URL, FakeWorld
from tests.unit.fakes import FixedClock, winner_creates, winner_moves
from tests.unit.proofs import paid, ref_of
from tests.unit.table import CANCELED, CELLS, CONFLICT_CELLS, FAILED, FULFILLED, PENDING


async def create(
    fake: FakeWorld,
    actor: Actor,
    course: str = "python-basics",
    clock: FixedClock | None = None,
    **kwargs: Any,
) -> Purchase:
    clock = clock or FixedClock()
    return await services.create_purchase(fake.uow, actor, course=course, clock=clock, **kwargs)


async def fulfill(
    fake: FakeWorld,
    actor: Actor,
    purchase_id: str,
    state: PurchaseState,
    clock: FixedClock,
    error_msg: str | None = None,
    proof: SignedPayment | None = None,
) -> Fulfillment:
    return await services.fulfill_purchase(
        fake.uow,
        actor,
        FrontendLinks(FRONTEND_URL),
        purchase_id=purchase_id,
        purchase_state=state,
        error_msg=error_msg,
        payment_proof=proof,
        verifier=PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp),
        clock=clock,
    )


async def pay(fake: FakeWorld, actor: Actor, purchase: Purchase, clock: FixedClock) -> Fulfillment:
    """Fulfil as a buyer does: with a signed payment event that pays the purchase."""
    proof = paid(purchase, clock)
    return await fulfill(fake, actor, purchase.purchase_id, FULFILLED, clock, proof=proof)


async def purchase_in(
    fake: FakeWorld, state: PurchaseState, clock: FixedClock, error_msg: str = "declined"
) -> Purchase:
    """A purchase of alice's brought to ``state`` through the services themselves
    (alice pays with a signed payment event to fulfil it)."""
    purchase = await create(fake, fake.alice, clock=clock)
    if state is FULFILLED:
        clock.advance()
        await pay(fake, fake.alice, purchase, clock)
    elif state is not PENDING:
        clock.advance()
        await fulfill(fake, fake.alice, purchase.purchase_id, state, clock, error_msg)
    clock.advance()
    return fake.uow.purchase(purchase.purchase_id)


# purchase.create


async def test_create_makes_a_pending_purchase_at_the_course_price(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, "sql-fundamentals", clock)

    assert purchase.state is PENDING
    assert purchase.owner_id == fake.alice.user_id
    assert purchase.owner_email == "alice@example.com"
    assert purchase.course_slug == "sql-fundamentals"
    assert purchase.amount == Decimal("39.50")
    assert purchase.currency == "EUR"
    assert purchase.created_at == purchase.updated_at == clock()
    assert purchase.fulfilled_at is None
    assert purchase.error_msg is None
    assert re.fullmatch(r"[0-9a-f]{32}", purchase.purchase_id)
    assert fake.uow.purchases == [purchase]
    assert fake.uow.commits == 1
    assert fake.uow.opened == [True]


async def test_purchase_ids_are_unguessable_and_distinct(fake: FakeWorld) -> None:
    first = await create(fake, fake.alice)
    second = await create(fake, fake.alice)
    assert first.purchase_id != second.purchase_id
    assert len(fake.uow.purchases) == 2


async def test_create_unknown_course_is_not_found_with_data(fake: FakeWorld) -> None:
    with pytest.raises(NotFound) as raised:
        await create(fake, fake.alice, "no-such-course")
    assert raised.value.message == "Course not found"
    assert raised.value.data == {"course": "no-such-course"}
    assert fake.uow.purchases == []
    assert fake.uow.commits == 0


async def test_idempotency_key_replays_the_same_purchase_and_creates_nothing(
    fake: FakeWorld, clock: FixedClock
) -> None:
    first = await create(fake, fake.alice, clock=clock, idempotency_key="order-1")
    clock.advance(60)
    again = await create(fake, fake.alice, clock=clock, idempotency_key="order-1")

    assert again == first
    assert fake.uow.purchases == [first]
    assert fake.uow.commits == 1


async def test_idempotency_key_reused_for_another_course_is_a_conflict(fake: FakeWorld) -> None:
    first = await create(fake, fake.alice, "python-basics", idempotency_key="order-1")

    with pytest.raises(IdempotencyKeyReused) as raised:
        await create(fake, fake.alice, "sql-fundamentals", idempotency_key="order-1")

    assert isinstance(raised.value, Conflict)
    assert raised.value.data == {"idempotency_key": "order-1", "course": "python-basics"}
    assert fake.uow.purchases == [first]
    assert fake.uow.commits == 1


async def test_idempotency_keys_are_per_user(fake: FakeWorld) -> None:
    alices = await create(fake, fake.alice, idempotency_key="order-1")
    bobs = await create(fake, fake.bob, "sql-fundamentals", idempotency_key="order-1")

    assert bobs.purchase_id != alices.purchase_id
    assert bobs.owner_id == fake.bob.user_id
    assert bobs.course_slug == "sql-fundamentals"
    assert len(fake.uow.purchases) == 2


async def test_without_a_key_every_call_creates_a_purchase(fake: FakeWorld) -> None:
    await create(fake, fake.alice)
    await create(fake, fake.alice)
    assert len(fake.uow.purchases) == 2
    assert fake.uow.commits == 2


async def test_create_that_loses_an_idempotency_race_answers_with_the_winner(
    fake: FakeWorld, clock: FixedClock
) -> None:
    fake.uow.interleave(
        "purchases.add",
        winner_creates("a" * 32, fake.alice.user_id, "python-basics", "order-1", now=clock()),
    )

    answer = await create(fake, fake.alice, clock=clock, idempotency_key="order-1")

    assert answer.purchase_id == "a" * 32
    assert fake.uow.purchases == [answer]
    assert fake.uow.commits == 0  # the winner committed; the loser only reads


async def test_create_that_loses_an_idempotency_race_for_another_course_conflicts(
    fake: FakeWorld, clock: FixedClock
) -> None:
    fake.uow.interleave(
        "purchases.add",
        winner_creates("a" * 32, fake.alice.user_id, "sql-fundamentals", "order-1", now=clock()),
    )

    with pytest.raises(IdempotencyKeyReused) as raised:
        await create(fake, fake.alice, "python-basics", clock, idempotency_key="order-1")

    assert raised.value.data == {"idempotency_key": "order-1", "course": "sql-fundamentals"}
    assert len(fake.uow.purchases) == 1


# purchase.get


async def test_get_own_purchase(fake: FakeWorld) -> None:
    created = await create(fake, fake.alice)
    got = await services.get_purchase(fake.uow, fake.alice, purchase_id=created.purchase_id)
    assert got == created
    assert fake.uow.opened[-1] is False  # a read needs no write lock


async def test_get_another_users_purchase_is_not_found(fake: FakeWorld) -> None:
    created = await create(fake, fake.alice)
    with pytest.raises(NotFound) as raised:
        await services.get_purchase(fake.uow, fake.bob, purchase_id=created.purchase_id)
    assert raised.value.data == {"purchase_id": created.purchase_id}


async def test_get_unknown_purchase_is_not_found(fake: FakeWorld) -> None:
    with pytest.raises(NotFound):
        await services.get_purchase(fake.uow, fake.alice, purchase_id="0" * 32)


async def test_staff_get_any_purchase(fake: FakeWorld) -> None:
    created = await create(fake, fake.alice)
    got = await services.get_purchase(fake.uow, fake.staff, purchase_id=created.purchase_id)
    assert got == created


# purchase.list


async def make_purchases(fake: FakeWorld, actor: Actor, count: int) -> list[Purchase]:
    return [await create(fake, actor) for _ in range(count)]


async def test_list_is_newest_first_and_only_the_callers(fake: FakeWorld) -> None:
    alices = await make_purchases(fake, fake.alice, 3)
    await make_purchases(fake, fake.bob, 2)

    page = await services.list_purchases(fake.uow, fake.alice)

    assert page.items == alices[::-1]
    assert page.next_before is None
    assert fake.uow.opened[-1] is False


async def test_list_pages_through_everything_with_next_before(fake: FakeWorld) -> None:
    alices = await make_purchases(fake, fake.alice, 5)
    await make_purchases(fake, fake.bob, 2)

    seen: list[Purchase] = []
    sizes: list[int] = []
    cursor: int | None = None
    for _ in range(10):
        page = await services.list_purchases(fake.uow, fake.alice, limit=2, cursor=cursor)
        seen += page.items
        sizes.append(len(page.items))
        cursor = page.next_before
        if cursor is None:
            break

    assert sizes == [2, 2, 1]
    assert seen == alices[::-1]


async def test_a_full_last_page_has_no_next(fake: FakeWorld) -> None:
    alices = await make_purchases(fake, fake.alice, 4)
    first = await services.list_purchases(fake.uow, fake.alice, limit=2)
    assert first.next_before == alices[2].pk
    second = await services.list_purchases(fake.uow, fake.alice, limit=2, cursor=first.next_before)
    assert second.items == [alices[1], alices[0]]
    assert second.next_before is None


async def test_list_limit(fake: FakeWorld) -> None:
    alices = await make_purchases(fake, fake.alice, 3)
    page = await services.list_purchases(fake.uow, fake.alice, limit=1)
    assert page.items == [alices[-1]]
    assert page.next_before == alices[-1].pk


async def test_list_default_limit_is_20(fake: FakeWorld) -> None:
    await make_purchases(fake, fake.alice, 21)
    page = await services.list_purchases(fake.uow, fake.alice)
    assert len(page.items) == 20
    assert page.next_before is not None


async def test_list_filters_by_state(fake: FakeWorld, clock: FixedClock) -> None:
    alices = await make_purchases(fake, fake.alice, 4)
    for purchase in (alices[0], alices[2]):
        await pay(fake, fake.alice, purchase, clock)

    fulfilled = await services.list_purchases(fake.uow, fake.alice, state=FULFILLED)
    pending = await services.list_purchases(fake.uow, fake.alice, state=PENDING)

    assert [p.purchase_id for p in fulfilled.items] == [
        alices[2].purchase_id,
        alices[0].purchase_id,
    ]
    assert all(p.state is FULFILLED for p in fulfilled.items)
    assert [p.purchase_id for p in pending.items] == [
        alices[3].purchase_id,
        alices[1].purchase_id,
    ]


async def test_staff_list_sees_every_user(fake: FakeWorld) -> None:
    alices = await make_purchases(fake, fake.alice, 2)
    bobs = await make_purchases(fake, fake.bob, 2)
    page = await services.list_purchases(fake.uow, fake.staff)
    assert page.items == (alices + bobs)[::-1]


# purchase.fulfill


async def test_fulfill_pending_creates_one_registration_and_one_receipt(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    commits = fake.uow.commits

    answer = await pay(fake, fake.alice, purchase, clock)

    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is FULFILLED
    assert stored.fulfilled_at == stored.updated_at == clock()
    assert stored.created_at == purchase.created_at
    assert answer.redirect_url == f"{FRONTEND_URL}/courses/python-basics/start"
    [registration] = fake.uow.registrations
    assert registration.purchase_pk == purchase.pk
    assert registration.user_id == fake.alice.user_id
    assert registration.course_pk == fake.python.pk
    [receipt] = fake.uow.receipts
    assert receipt.purchase_pk == purchase.pk
    assert receipt.recipient == "alice@example.com"
    assert fake.uow.commits == commits + 1
    assert fake.uow.opened[-1] is True


async def test_repeated_fulfill_answers_identically_and_changes_nothing(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    first = await pay(fake, fake.alice, purchase, clock)
    commits = fake.uow.commits
    clock.advance(3600)

    # A repeat needs no proof (the purchase is already fulfilled).
    again = await fulfill(fake, fake.alice, purchase.purchase_id, FULFILLED, clock)

    assert again == first
    assert fake.uow.purchase(purchase.purchase_id) == first.purchase
    assert len(fake.uow.registrations) == 1
    assert len(fake.uow.receipts) == 1
    assert fake.uow.commits == commits


async def test_fail_records_error_msg(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await purchase_in(fake, PENDING, clock)

    answer = await fulfill(fake, fake.alice, purchase.purchase_id, FAILED, clock, "Card declined")

    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is FAILED
    assert stored.error_msg == "Card declined"
    assert stored.fulfilled_at is None
    assert stored.updated_at == clock()
    assert answer.redirect_url == f"{FRONTEND_URL}/checkout/{purchase.purchase_id}"
    assert fake.uow.registrations == []
    assert fake.uow.receipts == []


async def test_repeated_fail_with_another_message_keeps_the_first(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    first = await fulfill(fake, fake.alice, purchase.purchase_id, FAILED, clock, "Card declined")
    commits = fake.uow.commits
    clock.advance()

    again = await fulfill(fake, fake.alice, purchase.purchase_id, FAILED, clock, "Something else")

    assert again == first
    assert fake.uow.purchase(purchase.purchase_id).error_msg == "Card declined"
    assert fake.uow.commits == commits


async def test_failed_then_fulfilled_clears_error_msg_and_registers(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, FAILED, clock, "Card declined")

    answer = await pay(fake, fake.alice, purchase, clock)

    assert answer.purchase.state is FULFILLED
    assert answer.purchase.error_msg is None
    assert fake.uow.purchase(purchase.purchase_id).error_msg is None
    assert len(fake.uow.registrations) == 1
    assert len(fake.uow.receipts) == 1


@pytest.mark.parametrize("start", [PENDING, FAILED])
async def test_cancel(fake: FakeWorld, clock: FixedClock, start: PurchaseState) -> None:
    purchase = await purchase_in(fake, start, clock)

    answer = await fulfill(fake, fake.alice, purchase.purchase_id, CANCELED, clock)

    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is CANCELED
    assert stored.error_msg is None
    assert stored.fulfilled_at is None
    assert answer.redirect_url == f"{FRONTEND_URL}/courses/python-basics"
    assert fake.uow.registrations == []
    assert fake.uow.receipts == []


@pytest.mark.parametrize("requested", [FULFILLED, CANCELED])
async def test_error_msg_is_recorded_only_for_failed(
    fake: FakeWorld, clock: FixedClock, requested: PurchaseState
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    proof = paid(purchase, clock) if requested is FULFILLED else None
    answer = await fulfill(
        fake, fake.alice, purchase.purchase_id, requested, clock, "ignored", proof
    )
    assert answer.purchase.error_msg is None
    assert fake.uow.purchase(purchase.purchase_id).error_msg is None


@pytest.mark.parametrize(
    ("current", "requested", "step"),
    [(current, requested, step) for (current, requested), step in CELLS],
    ids=[f"{current}->{requested}" for (current, requested), _ in CELLS],
)
async def test_every_cell_of_the_table_through_the_service(
    fake: FakeWorld,
    clock: FixedClock,
    current: PurchaseState,
    requested: PurchaseState,
    step: Step,
) -> None:
    before = await purchase_in(fake, current, clock)
    registrations = len(fake.uow.registrations)
    commits = fake.uow.commits
    # Alice pays whenever she asks for fulfilled, as her browser does.
    proof = paid(before, clock) if requested is FULFILLED else None

    if step is Step.CONFLICT:
        with pytest.raises(InvalidTransition):
            await fulfill(fake, fake.alice, before.purchase_id, requested, clock, "oops", proof)
        assert fake.uow.purchase(before.purchase_id) == before
        assert fake.uow.commits == commits
        return

    answer = await fulfill(fake, fake.alice, before.purchase_id, requested, clock, "oops", proof)
    after = fake.uow.purchase(before.purchase_id)
    assert answer.purchase == after
    assert after.state is requested
    if step is Step.REPEAT:
        assert after == before
        assert fake.uow.commits == commits
    else:
        assert after.updated_at == clock() != before.updated_at
        assert fake.uow.commits == commits + 1
    expected_registrations = 1 if requested is FULFILLED else 0
    if current is FULFILLED:
        assert registrations == 1
    assert len(fake.uow.registrations) == expected_registrations
    assert len(fake.uow.receipts) == expected_registrations


@pytest.mark.parametrize(
    ("current", "requested"),
    CONFLICT_CELLS,
    ids=[f"{current}->{requested}" for current, requested in CONFLICT_CELLS],
)
async def test_conflict_raises_invalid_transition_and_changes_nothing(
    fake: FakeWorld, clock: FixedClock, current: PurchaseState, requested: PurchaseState
) -> None:
    before = await purchase_in(fake, current, clock)
    registrations, receipts = fake.uow.registrations, fake.uow.receipts
    commits = fake.uow.commits
    transitions = len(fake.uow.transition_calls)

    with pytest.raises(InvalidTransition) as raised:
        await fulfill(fake, fake.alice, before.purchase_id, requested, clock, "oops")

    assert isinstance(raised.value, Conflict)
    assert raised.value.data == {"current_state": current, "requested_state": requested}
    assert raised.value.message == f"A {current} purchase cannot become {requested}"
    assert fake.uow.purchase(before.purchase_id) == before
    assert fake.uow.registrations == registrations
    assert fake.uow.receipts == receipts
    assert fake.uow.commits == commits
    assert len(fake.uow.transition_calls) == transitions  # no update is even attempted


async def test_another_users_purchase_cannot_be_fulfilled(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    commits = fake.uow.commits

    with pytest.raises(NotFound) as raised:
        await fulfill(fake, fake.bob, purchase.purchase_id, FULFILLED, clock)

    assert raised.value.data == {"purchase_id": purchase.purchase_id}
    assert fake.uow.purchase(purchase.purchase_id) == purchase
    assert fake.uow.registrations == []
    assert fake.uow.receipts == []
    assert fake.uow.commits == commits
    assert fake.uow.transition_calls == []


async def test_unknown_purchase_cannot_be_fulfilled(fake: FakeWorld, clock: FixedClock) -> None:
    with pytest.raises(NotFound):
        await fulfill(fake, fake.alice, "0" * 32, FULFILLED, clock)
    assert fake.uow.commits == 0


async def test_staff_fulfills_for_the_owner(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await purchase_in(fake, PENDING, clock)

    answer = await fulfill(fake, fake.staff, purchase.purchase_id, FULFILLED, clock)

    assert answer.purchase.state is FULFILLED
    assert answer.purchase.owner_id == fake.alice.user_id
    [registration] = fake.uow.registrations
    assert registration.user_id == fake.alice.user_id
    [receipt] = fake.uow.receipts
    assert receipt.recipient == "alice@example.com"
    last = fake.uow.events_of(purchase.purchase_id)[-1]
    assert (last.actor_user_id, last.actor_scope) == (fake.staff.user_id, Scope.STAFF)
    assert last.backing is Backing.STAFF_COMP  # no payment: recorded as a comp


@pytest.mark.parametrize(
    ("requested", "path"),
    [
        (FULFILLED, "/courses/python-basics/start"),
        (FAILED, "/checkout/{purchase_id}"),
        (CANCELED, "/courses/python-basics"),
    ],
)
async def test_redirect_url_per_outcome(
    fake: FakeWorld, clock: FixedClock, requested: PurchaseState, path: str
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    proof = paid(purchase, clock) if requested is FULFILLED else None
    answer = await fulfill(fake, fake.alice, purchase.purchase_id, requested, clock, proof=proof)
    assert answer.redirect_url == FRONTEND_URL + path.format(purchase_id=purchase.purchase_id)


# Lost races: another writer changes the purchase between our read and our update.


async def test_lost_race_to_the_same_outcome_is_a_repeat(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    commits = fake.uow.commits
    events = len(fake.uow.events)
    winners_time = clock()
    proof = paid(purchase, clock)
    # The webhook delivers the same payment event first.
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(
            purchase.purchase_id,
            FULFILLED,
            now=winners_time,
            payment_ref=ref_of(proof),
            payment_event_id=proof.message_id,
            backing=Backing.PAYMENT_EVENT,
        ),
    )
    clock.advance()

    answer = await fulfill(fake, fake.alice, purchase.purchase_id, FULFILLED, clock, proof=proof)

    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is FULFILLED
    assert stored.updated_at == stored.fulfilled_at == winners_time
    assert answer.redirect_url == f"{FRONTEND_URL}/courses/python-basics/start"
    assert len(fake.uow.registrations) == 1  # the winner's only
    assert len(fake.uow.receipts) == 1
    assert fake.uow.commits == commits  # the loser commits nothing
    assert len(fake.uow.transition_calls) == 1
    [winners] = fake.uow.events[events:]  # the winner's event only
    assert (winners.source, winners.actor_user_id) == (Source.WEBHOOK, None)


async def test_lost_race_to_a_conflicting_outcome_is_a_conflict(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(
            purchase.purchase_id,
            CANCELED,
            now=clock(),
            actor=EventActor.of(fake.alice),
            source=Source.RPC,
        ),
    )

    with pytest.raises(InvalidTransition) as raised:
        await pay(fake, fake.alice, purchase, clock)

    assert raised.value.data == {"current_state": CANCELED, "requested_state": FULFILLED}
    assert fake.uow.purchase(purchase.purchase_id).state is CANCELED
    assert fake.uow.registrations == []
    assert fake.uow.receipts == []


async def test_lost_race_to_failed_answers_with_the_winners_error(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    commits = fake.uow.commits
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(purchase.purchase_id, FAILED, now=clock(), error_msg="theirs"),
    )

    answer = await fulfill(fake, fake.alice, purchase.purchase_id, FAILED, clock, "ours")
    assert [e.error_msg for e in fake.uow.events_of(purchase.purchase_id)] == [None, "theirs"]

    assert answer.purchase.state is FAILED
    assert answer.purchase.error_msg == "theirs"
    assert fake.uow.purchase(purchase.purchase_id).error_msg == "theirs"
    assert answer.redirect_url == f"{FRONTEND_URL}/checkout/{purchase.purchase_id}"
    assert fake.uow.commits == commits


async def test_concurrent_failure_then_our_fulfill_applies_from_failed(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await purchase_in(fake, PENDING, clock)
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(purchase.purchase_id, FAILED, now=clock(), error_msg="theirs"),
    )
    clock.advance()

    answer = await pay(fake, fake.alice, purchase, clock)

    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is FULFILLED
    assert stored.error_msg is None
    assert stored.fulfilled_at == clock()
    # Our change is recorded from the state it applied to, after the winner's.
    steps = [(e.from_state, e.to_state) for e in fake.uow.events_of(purchase.purchase_id)]
    assert steps == [(None, PENDING), (PENDING, FAILED), (FAILED, FULFILLED)]
    assert len(fake.uow.registrations) == 1
    assert len(fake.uow.receipts) == 1


async def test_lost_update_is_retried_from_the_state_read_back(
    fake: FakeWorld, clock: FixedClock
) -> None:
    """The conditional update reports False once; the re-read state (failed) still applies."""
    purchase = await purchase_in(fake, PENDING, clock)
    commits = fake.uow.commits
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(purchase.purchase_id, FAILED, now=clock(), error_msg="theirs"),
    )
    fake.uow.lose_next_transitions(1)
    clock.advance()

    answer = await pay(fake, fake.alice, purchase, clock)

    assert [call[2] for call in fake.uow.transition_calls[-2:]] == [FULFILLED, FULFILLED]
    # Each attempt is conditional on the state it read: pending, then failed.
    assert [call[1] for call in fake.uow.transition_calls[-2:]] == [
        frozenset({PENDING}),
        frozenset({FAILED}),
    ]
    stored = fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase == stored
    assert stored.state is FULFILLED
    assert stored.error_msg is None
    assert len(fake.uow.registrations) == 1
    assert len(fake.uow.receipts) == 1
    assert fake.uow.commits == commits + 1


async def test_lost_update_then_a_repeat_creates_nothing(
    fake: FakeWorld, clock: FixedClock
) -> None:
    """Lose once while another writer fulfills: answer as that writer did, no duplicates."""
    purchase = await purchase_in(fake, FAILED, clock)
    commits = fake.uow.commits
    fake.uow.interleave(
        "purchases.transition", winner_moves(purchase.purchase_id, FULFILLED, now=clock())
    )
    fake.uow.lose_next_transitions(1)
    events = len(fake.uow.events)

    answer = await pay(fake, fake.alice, purchase, clock)

    assert len(fake.uow.events) == events + 1  # the winner's

    assert answer.purchase == fake.uow.purchase(purchase.purchase_id)
    assert answer.purchase.state is FULFILLED
    assert len(fake.uow.registrations) == 1
    assert len(fake.uow.receipts) == 1
    assert fake.uow.commits == commits


# Tokens, courses, registrations.


async def test_issue_token_stores_only_the_hash_and_authenticates(
    fake: FakeWorld, clock: FixedClock
) -> None:
    token = await services.issue_token(fake.uow, "carol@example.com", clock=clock)

    assert token.startswith(TOKEN_PREFIX)
    assert token not in fake.uow.tokens
    assert hash_token(token) in fake.uow.tokens
    actor = await services.authenticate(fake.uow, token, clock=clock)
    assert actor is not None
    assert actor.email == "carol@example.com"
    assert actor.scope is Scope.BUYER
    assert actor.is_staff is False


async def test_issue_token_twice_gives_distinct_tokens_for_one_user(fake: FakeWorld) -> None:
    first = await services.issue_token(fake.uow, "carol@example.com")
    second = await services.issue_token(fake.uow, "carol@example.com")
    assert first != second
    first_actor = await services.authenticate(fake.uow, first)
    second_actor = await services.authenticate(fake.uow, second)
    assert first_actor == second_actor is not None


async def test_issuing_a_fixed_token_again_is_a_no_op(fake: FakeWorld) -> None:
    fixed = "demo-token-value"
    assert await services.issue_token(fake.uow, "demo@example.com", token=fixed) == fixed
    tokens = fake.uow.tokens
    assert await services.issue_token(fake.uow, "demo@example.com", token=fixed) == fixed
    assert fake.uow.tokens == tokens


async def test_issue_staff_token(fake: FakeWorld) -> None:
    token = await services.issue_token(fake.uow, "desk@example.com", is_staff=True)
    actor = await services.authenticate(fake.uow, token)
    assert actor is not None
    assert actor.is_staff is True
    assert actor.scope is Scope.STAFF
    assert actor.sees_every_purchase is True
    [user] = [u for u in fake.uow.users.values() if u.email == "desk@example.com"]
    assert user.is_staff is True  # a new user's role follows its first token


@pytest.mark.parametrize("scope", list(Scope))
async def test_issue_token_of_each_scope(fake: FakeWorld, scope: Scope) -> None:
    token = await services.issue_token(fake.uow, "svc@example.com", scope=scope)
    actor = await services.authenticate(fake.uow, token)
    assert actor is not None
    assert actor.scope is scope
    assert actor.is_staff is (scope is Scope.STAFF)
    assert actor.sees_every_purchase is (scope is not Scope.BUYER)
    assert fake.uow.tokens[hash_token(token)].scope is scope


async def test_issuing_a_token_changes_no_other_token_and_no_existing_user(
    fake: FakeWorld,
) -> None:
    staff_token = await services.issue_token(fake.uow, "desk@example.com", scope=Scope.STAFF)
    users = fake.uow.users
    buyer_token = await services.issue_token(fake.uow, "desk@example.com")
    payments_token = await services.issue_token(fake.uow, "desk@example.com", scope=Scope.PAYMENTS)

    assert fake.uow.users == users  # the staff user was not demoted, nor created again
    scopes = [
        actor.scope if (actor := await services.authenticate(fake.uow, token)) else None
        for token in (staff_token, buyer_token, payments_token)
    ]
    assert scopes == [Scope.STAFF, Scope.BUYER, Scope.PAYMENTS]


async def test_unknown_token_authenticates_nobody(fake: FakeWorld) -> None:
    assert await services.authenticate(fake.uow, "rpcs_unknown") is None


async def test_save_course_creates_then_updates(fake: FakeWorld) -> None:
    created = await services.save_course(
        fake.uow, slug="rust", title="Rust", price=Decimal("10.00"), currency="USD"
    )
    updated = await services.save_course(
        fake.uow, slug="rust", title="Rust 2", price=Decimal("12.50"), currency="EUR"
    )
    assert updated.pk == created.pk
    assert (updated.title, updated.price, updated.currency) == ("Rust 2", Decimal("12.50"), "EUR")
    courses = await services.list_courses(fake.uow)
    assert [c.slug for c in courses] == ["python-basics", "rust", "sql-fundamentals"]
    assert courses[1] == updated


async def test_list_registrations_newest_first_and_own_only(
    fake: FakeWorld, clock: FixedClock
) -> None:
    python = await create(fake, fake.alice, "python-basics")
    sql = await create(fake, fake.alice, "sql-fundamentals")
    bobs = await create(fake, fake.bob, "python-basics")
    for actor, purchase in ((fake.alice, python), (fake.alice, sql), (fake.bob, bobs)):
        clock.advance()
        await pay(fake, actor, purchase, clock)

    registrations = (await services.list_registrations(fake.uow, fake.alice)).items

    assert [(r.course_slug, r.purchase_id) for r in registrations] == [
        ("sql-fundamentals", sql.purchase_id),
        ("python-basics", python.purchase_id),
    ]
    assert registrations[0].created_at > registrations[1].created_at


# FrontendLinks itself.


def test_links_strip_a_trailing_slash_and_quote_path_parts(fake: FakeWorld) -> None:
    purchase = Purchase(
        pk=1,
        purchase_id="abc",
        owner_id=1,
        owner_email="a@example.com",
        course_pk=1,
        course_slug="a b/c",
        course_title="t",
        amount=Decimal(1),
        currency="USD",
        state=FULFILLED,
        error_msg=None,
        created_at=FixedClock()(),
        updated_at=FixedClock()(),
        fulfilled_at=None,
    )
    links = FrontendLinks("https://shop.example/")
    assert links.after_fulfillment(purchase) == "https://shop.example/courses/a%20b%2Fc/start"
    pending = links.after_fulfillment(replace(purchase, state=PENDING))
    assert pending == "https://shop.example/courses/a%20b%2Fc"
