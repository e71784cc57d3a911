"""The fake unit of work behaves like a transaction, so the service tests can trust it."""

from __future__ import annotations

from datetime import datetime

import pytest

from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.records import (
    WEBHOOK_ACTOR,
    Backing,
    EventActor,
    NewPurchaseEvent,
    Purchase,
    Source,
    StateChange,
)
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.domain.tokens import hash_token
from tests.unit.conftest import FakeWorld
from tests.unit.fakes import (
    FakeUnitOfWork,
    FixedClock,
    ForeignKeyViolation,
    ReadOnlyUnitOfWork,
    winner_moves,
)

PENDING, FULFILLED, FAILED = PurchaseState.PENDING, PurchaseState.FULFILLED, PurchaseState.FAILED


async def test_changes_without_commit_are_discarded(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert await uow.purchases.get("abc", owner_id=None) is not None
    assert fake.uow.purchases == []
    assert fake.uow.commits == 0
    assert fake.uow.rollbacks == 1


async def test_changes_are_discarded_when_the_block_raises(
    fake: FakeWorld, clock: FixedClock
) -> None:
    with pytest.raises(RuntimeError):
        async with fake.uow(write=True) as uow:
            await uow.courses.save(slug="rust", title="Rust", price=fake.python.price, currency="X")
            raise RuntimeError
    assert "rust" not in fake.uow.committed.courses


async def test_commit_publishes_and_later_changes_are_discarded(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert purchase is not None
        await uow.commit()
        changed = await uow.purchases.transition(
            purchase.pk,
            sources=frozenset({PurchaseState.PENDING}),
            target=PurchaseState.CANCELED,
            error_msg=None,
            now=clock(),
        )
        assert changed
    assert fake.uow.purchase("abc").state is PurchaseState.PENDING
    assert fake.uow.commits == 1


async def test_transition_is_conditional(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert purchase is not None
        refused = await uow.purchases.transition(
            purchase.pk,
            sources=frozenset({PurchaseState.FAILED}),
            target=PurchaseState.FULFILLED,
            error_msg=None,
            now=clock(),
        )
        stored = await uow.purchases.get("abc", owner_id=None)
    assert refused is None
    assert stored == purchase


async def test_read_only_units_refuse_writes(fake: FakeWorld) -> None:
    async with fake.uow() as uow:
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.commit()
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.courses.save(slug="x", title="x", price=fake.python.price, currency="USD")


# The guarantees of the ports of issue 14: scopes, payment_ref, the audit trail.


async def add_purchase(
    uow: FakeUnitOfWork, fake: FakeWorld, purchase_id: str, now: datetime
) -> Purchase:
    purchase = await uow.purchases.add(
        purchase_id=purchase_id, owner_id=fake.alice.user_id, course=fake.python,
        idempotency_key=None, now=now,
    )  # fmt: skip
    assert purchase is not None
    return purchase


async def fulfil_with(
    uow: FakeUnitOfWork, pk: int, ref: str | None, now: datetime
) -> StateChange | None:
    return await uow.purchases.transition(
        pk, sources=frozenset({PENDING}), target=FULFILLED, error_msg=None, now=now,
        payment_ref=ref,
    )  # fmt: skip


def created(pk: int, actor: EventActor) -> NewPurchaseEvent:
    return NewPurchaseEvent(
        purchase_pk=pk, from_state=None, to_state=PENDING, actor=actor, source=Source.RPC
    )


async def test_ensure_user_returns_the_id_and_never_changes_an_existing_user(
    fake: FakeWorld, clock: FixedClock
) -> None:
    users = fake.uow.users
    async with fake.uow(write=True) as uow:
        staff_id = await uow.users.ensure_user("support@example.com", is_staff=False, now=clock())
        new_id = await uow.users.ensure_user("carol@example.com", is_staff=True, now=clock())
        again = await uow.users.ensure_user("carol@example.com", is_staff=False, now=clock())
        await uow.commit()
    assert staff_id == fake.staff.user_id
    assert fake.uow.users[staff_id] == users[staff_id]  # still staff
    assert fake.uow.users[staff_id].is_staff is True
    assert again == new_id not in users
    assert fake.uow.users[new_id].is_staff is True


async def test_find_actor_has_the_scope_of_the_token_not_of_the_user(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        for scope in Scope:
            assert await uow.users.add_token(
                fake.staff.user_id, hash_token(f"t-{scope}"), scope=scope, now=clock()
            )
        # A hash already stored is left as it is.
        assert not await uow.users.add_token(
            fake.staff.user_id, hash_token("t-buyer"), scope=Scope.PAYMENTS, now=clock()
        )
        await uow.commit()
    async with fake.uow() as uow:
        for scope in Scope:
            actor = await uow.users.find_actor(hash_token(f"t-{scope}"), now=clock())
            assert actor is not None
            assert (actor.user_id, actor.email, actor.scope) == (
                fake.staff.user_id,
                "support@example.com",
                scope,
            )


async def test_a_payment_ref_fulfils_one_purchase_only(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        first = await add_purchase(uow, fake, "first", clock())
        second = await add_purchase(uow, fake, "second", clock())
        assert await fulfil_with(uow, first.pk, "pi_1", clock())
        assert await uow.purchases.holder_of_payment_ref("pi_1") == first.pk
        assert await uow.purchases.holder_of_payment_ref("pi_2") is None
        with pytest.raises(PaymentNotVerified) as raised:
            await fulfil_with(uow, second.pk, "pi_1", clock())
        assert raised.value.reason == "reused"
        assert (await uow.purchases.get("second", owner_id=None)) == second  # unchanged
        await uow.commit()
    assert fake.uow.payment_ref_of("first") == "pi_1"
    assert fake.uow.payment_ref_of("second") is None


async def test_a_missed_transition_never_checks_the_payment_ref(
    fake: FakeWorld, clock: FixedClock
) -> None:
    """As in SQL, the UNIQUE constraint only bites on a row the UPDATE changes."""
    async with fake.uow(write=True) as uow:
        first = await add_purchase(uow, fake, "first", clock())
        second = await add_purchase(uow, fake, "second", clock())
        assert await fulfil_with(uow, first.pk, "pi_1", clock())
        refused = await uow.purchases.transition(
            second.pk, sources=frozenset({FAILED}), target=FULFILLED, error_msg=None,
            now=clock(), payment_ref="pi_1",
        )  # fmt: skip
    assert refused is None


async def test_only_a_fulfilment_records_a_payment_ref(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        assert await uow.purchases.transition(
            purchase.pk, sources=frozenset({PENDING}), target=FAILED, error_msg="declined",
            now=clock(), payment_ref="pi_failed",
        )  # fmt: skip
        await uow.commit()
    assert fake.uow.payment_ref_of("abc") is None
    assert fake.uow.transition_calls[-1] == (
        purchase.pk,
        frozenset({PENDING}),
        FAILED,
        "declined",
        "pi_failed",
    )


async def test_registrations_exist_per_user_and_course(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        assert not await uow.registrations.exists(fake.alice.user_id, fake.python.pk)
        await uow.registrations.add(purchase, now=clock())
        assert await uow.registrations.exists(fake.alice.user_id, fake.python.pk)
        assert not await uow.registrations.exists(fake.bob.user_id, fake.python.pk)
        assert not await uow.registrations.exists(fake.alice.user_id, fake.sql.pk)


async def test_events_are_numbered_in_order_and_listed_oldest_first(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        first = await uow.events.append(
            created(purchase.pk, EventActor.of(fake.alice)), now=clock()
        )
        second = await uow.events.append(
            NewPurchaseEvent(
                purchase_pk=purchase.pk, from_state=PENDING, to_state=FULFILLED,
                actor=WEBHOOK_ACTOR, source=Source.WEBHOOK, backing=Backing.PAYMENT_EVENT,
                payment_event_id="evt_1", payment_ref="pi_1",
            ),
            now=clock.advance(),
        )  # fmt: skip
        await uow.commit()
    assert (first, second) == (1, 2)
    async with fake.uow() as uow:
        history = await uow.events.list_for(purchase.pk)
        assert await uow.events.payment_event_applied("evt_1")
        assert not await uow.events.payment_event_applied("evt_2")
    assert [e.seq for e in history] == [1, 2]
    assert history[0].actor_email == "alice@example.com"
    assert history[0].actor_scope is Scope.BUYER
    assert history[0].purchase_id == "abc"
    assert (history[1].actor_user_id, history[1].actor_email, history[1].actor_scope) == (
        None,
        None,
        None,
    )
    assert (history[1].backing, history[1].payment_ref) == (Backing.PAYMENT_EVENT, "pi_1")
    assert [e.seq for e in fake.uow.events] == [1, 2]


async def test_a_rolled_back_event_number_is_given_out_again(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        await uow.commit()
    async with fake.uow(write=True) as uow:
        assert await uow.events.append(created(purchase.pk, WEBHOOK_ACTOR), now=clock()) == 1
    assert fake.uow.events == []
    async with fake.uow(write=True) as uow:
        assert await uow.events.append(created(purchase.pk, WEBHOOK_ACTOR), now=clock()) == 1
        await uow.commit()
    assert [e.seq for e in fake.uow.events] == [1]


async def test_events_name_an_existing_purchase_and_user(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        with pytest.raises(ForeignKeyViolation):
            await uow.events.append(created(purchase.pk + 100, WEBHOOK_ACTOR), now=clock())
        with pytest.raises(ForeignKeyViolation):
            await uow.events.append(
                created(purchase.pk, EventActor(9999, Scope.BUYER)), now=clock()
            )


async def test_read_only_units_refuse_to_append_events(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        await uow.commit()
    async with fake.uow() as uow:
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.events.append(created(purchase.pk, WEBHOOK_ACTOR), now=clock())
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.users.ensure_user("x@example.com", is_staff=False, now=clock())


async def test_a_concurrent_winner_writes_its_change_and_its_event(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await add_purchase(uow, fake, "abc", clock())
        await uow.commit()
    fake.uow.interleave(
        "purchases.transition",
        winner_moves("abc", FULFILLED, now=clock(), payment_ref="pi_w", payment_event_id="evt_w"),
    )
    async with fake.uow(write=True) as uow:
        lost = await uow.purchases.transition(
            purchase.pk, sources=frozenset({PENDING}), target=FAILED, error_msg="x", now=clock()
        )
        # The winner's committed change is visible to this unit of work.
        assert (await uow.purchases.get("abc", owner_id=None)) == fake.uow.purchase("abc")
    assert lost is None
    assert fake.uow.purchase("abc").state is FULFILLED
    assert fake.uow.payment_ref_of("abc") == "pi_w"
    assert len(fake.uow.registrations) == len(fake.uow.receipts) == 1
    [event] = fake.uow.events
    assert (event.from_state, event.to_state, event.source) == (PENDING, FULFILLED, Source.WEBHOOK)
    assert (event.payment_ref, event.payment_event_id) == ("pi_w", "evt_w")
