"""Only a verified payment fulfils (issue 14), through the domain services and the fakes.

Who may ask for which outcome (``states.OUTCOME_EVIDENCE``), what a payment proof must
match, the payment webhook's service, the audit trail and ``purchase.create`` for a
course already registered for. Proofs are signed by the ``standardwebhooks`` reference
library (``tests.payments``) and checked by the real ``PaymentSignatures``, whose clock
is the test's fixed clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from rpc_server.domain import services
from rpc_server.domain.errors import (
    AlreadyRegistered,
    Conflict,
    InvalidTransition,
    NotFound,
    PaymentNotVerified,
)
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import (
    Actor,
    Backing,
    EventActor,
    Fulfillment,
    PaymentEvent,
    Purchase,
    SignedPayment,
    Source,
)
from rpc_server.domain.services import PaymentEventResult
from rpc_server.domain.states import PurchaseState, Scope, Step
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY, signed_proof
from tests.unit.conftest import FRONTEND_URL, FakeWorld
from tests.unit.fakes import EventRow, FixedClock, winner_moves
from tests.unit.proofs import as_signed, paid, ref_of
from tests.unit.table import CELLS

PENDING = PurchaseState.PENDING
FULFILLED = PurchaseState.FULFILLED
FAILED = PurchaseState.FAILED
CANCELED = PurchaseState.CANCELED


@dataclass
class CountingVerifier:
    """The real verifier, counting its calls."""

    inner: PaymentSignatures
    calls: list[SignedPayment] = field(default_factory=list)

    @property
    def configured(self) -> bool:
        return self.inner.configured

    def verify(self, signed: SignedPayment) -> PaymentEvent:
        self.calls.append(signed)
        return self.inner.verify(signed)


async def create(
    fake: FakeWorld, actor: Actor, clock: FixedClock, course: str = "python-basics", **kwargs: Any
) -> Purchase:
    return await services.create_purchase(fake.uow, actor, course=course, clock=clock, **kwargs)


async def fulfill(
    fake: FakeWorld,
    actor: Actor,
    purchase: Purchase,
    state: PurchaseState,
    clock: FixedClock,
    *,
    proof: SignedPayment | None = None,
    error_msg: str | None = None,
    verifier: Any = None,
    source: Source = Source.RPC,
) -> Fulfillment:
    return await services.fulfill_purchase(
        fake.uow,
        actor,
        FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id,
        purchase_state=state,
        error_msg=error_msg,
        payment_proof=proof,
        verifier=verifier or PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp),
        source=source,
        clock=clock,
    )


async def deliver(
    fake: FakeWorld, signed: SignedPayment, clock: FixedClock, *, keys: tuple[str, ...] = ()
) -> tuple[PaymentEventResult, Purchase]:
    """What ``POST /webhooks/payments`` does with a signed event."""
    verifier = PaymentSignatures(keys or (TEST_PAYMENT_KEY,), clock=clock.timestamp)
    return await services.record_payment_event(fake.uow, verifier, signed, clock=clock)


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused call must leave as it was."""

    purchases: list[Purchase]
    payment_refs: list[str | None]
    registrations: int
    receipts: int
    events: list[EventRow]
    commits: int
    transitions: int


def snapshot(fake: FakeWorld) -> Snapshot:
    return Snapshot(
        purchases=fake.uow.purchases,
        payment_refs=[fake.uow.payment_ref_of(p.purchase_id) for p in fake.uow.purchases],
        registrations=len(fake.uow.registrations),
        receipts=len(fake.uow.receipts),
        events=fake.uow.events,
        commits=fake.uow.commits,
        transitions=len(fake.uow.transition_calls),
    )


def assert_nothing_written(fake: FakeWorld, before: Snapshot, *, attempted: bool = False) -> None:
    after = snapshot(fake)
    if not attempted:
        assert after.transitions == before.transitions  # no update was even attempted
    assert after == Snapshot(**{**before.__dict__, "transitions": after.transitions})
    assert fake.uow.open_units == []


async def refused(
    call: Any, fake: FakeWorld, reason: str, *, attempted: bool = False
) -> PaymentNotVerified:
    """Run ``call`` (a coroutine); it must raise PaymentNotVerified(reason), roll back
    and write nothing."""
    before = snapshot(fake)
    rollbacks, opened = fake.uow.rollbacks, len(fake.uow.opened)
    with pytest.raises(PaymentNotVerified) as raised:
        await call
    assert raised.value.reason == reason
    assert raised.value.data == {"reason": reason}
    assert raised.value.message.startswith("Payment not verified: ")
    assert_nothing_written(fake, before, attempted=attempted)
    # Every unit of work the call opened was rolled back.
    assert fake.uow.rollbacks - rollbacks == len(fake.uow.opened) - opened
    return raised.value


def changed(name: str, value: str) -> dict[str, Any]:
    """Keyword arguments of ``paid`` that change one field of the payload."""
    return {name: value}


def last_event(fake: FakeWorld, purchase: Purchase) -> EventRow:
    return fake.uow.events_of(purchase.purchase_id)[-1]


# A buyer fulfils only with a proof.


@pytest.mark.parametrize("start", [PENDING, FAILED])
async def test_a_buyer_without_a_proof_is_refused_and_nothing_is_written(
    fake: FakeWorld, clock: FixedClock, start: PurchaseState
) -> None:
    purchase = await create(fake, fake.alice, clock)
    if start is FAILED:
        await fulfill(fake, fake.alice, purchase, FAILED, clock, error_msg="declined")

    error = await refused(fulfill(fake, fake.alice, purchase, FULFILLED, clock), fake, "missing")

    assert "payment_proof" in error.message
    assert fake.uow.purchase(purchase.purchase_id).state is start
    assert fake.uow.registrations == []
    assert fake.uow.receipts == []


async def test_a_buyer_with_a_valid_proof_fulfils_and_the_event_says_so(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock, payment_ref="pi_alice_1")
    clock.advance()

    answer = await fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=proof)

    assert answer.purchase.state is FULFILLED
    assert answer.redirect_url == f"{FRONTEND_URL}/courses/python-basics/start"
    assert fake.uow.payment_ref_of(purchase.purchase_id) == "pi_alice_1"
    assert len(fake.uow.registrations) == len(fake.uow.receipts) == 1
    event = last_event(fake, purchase)
    assert (event.from_state, event.to_state) == (PENDING, FULFILLED)
    assert (event.actor_user_id, event.actor_scope) == (fake.alice.user_id, Scope.BUYER)
    assert event.source is Source.RPC
    assert event.backing is Backing.PAYMENT_EVENT
    assert event.payment_ref == "pi_alice_1"
    assert event.payment_event_id == proof.message_id
    assert event.error_msg is None
    assert event.created_at == clock()


async def test_the_source_of_a_change_is_recorded(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock, source=Source.CLI)
    await fulfill(fake, fake.staff, purchase, FULFILLED, clock, source=Source.CLI)
    assert [e.source for e in fake.uow.events_of(purchase.purchase_id)] == [Source.CLI] * 2


async def test_payments_scope_fulfils_without_a_proof(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)

    answer = await fulfill(fake, fake.payments, purchase, FULFILLED, clock)

    assert answer.purchase.state is FULFILLED
    assert answer.purchase.owner_id == fake.alice.user_id
    [registration] = fake.uow.registrations
    assert registration.user_id == fake.alice.user_id
    event = last_event(fake, purchase)
    assert (event.actor_user_id, event.actor_scope) == (fake.payments.user_id, Scope.PAYMENTS)
    assert event.backing is Backing.PAYMENTS_SCOPE
    assert (event.payment_ref, event.payment_event_id) == (None, None)
    assert fake.uow.payment_ref_of(purchase.purchase_id) is None


async def test_payments_scope_fulfils_even_with_no_key_configured(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    no_keys = PaymentSignatures((), clock=clock.timestamp)
    answer = await fulfill(fake, fake.payments, purchase, FULFILLED, clock, verifier=no_keys)
    assert answer.purchase.state is FULFILLED


async def test_payments_scope_with_a_proof_records_the_payment(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock)
    await fulfill(fake, fake.payments, purchase, FULFILLED, clock, proof=proof)
    event = last_event(fake, purchase)
    assert event.backing is Backing.PAYMENT_EVENT
    assert event.payment_ref == ref_of(proof) == fake.uow.payment_ref_of(purchase.purchase_id)


async def test_staff_without_a_proof_is_a_recorded_comp(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    no_keys = PaymentSignatures((), clock=clock.timestamp)

    answer = await fulfill(fake, fake.staff, purchase, FULFILLED, clock, verifier=no_keys)

    assert answer.purchase.state is FULFILLED
    assert len(fake.uow.registrations) == len(fake.uow.receipts) == 1
    event = last_event(fake, purchase)
    assert (event.actor_user_id, event.actor_scope) == (fake.staff.user_id, Scope.STAFF)
    assert event.backing is Backing.STAFF_COMP
    assert event.payment_ref is None


async def test_staff_with_a_valid_proof_is_backed_by_the_payment(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await fulfill(fake, fake.staff, purchase, FULFILLED, clock, proof=paid(purchase, clock))
    assert last_event(fake, purchase).backing is Backing.PAYMENT_EVENT


@pytest.mark.parametrize("who", ["alice", "staff", "payments"])
@pytest.mark.parametrize(
    ("bad_proof", "reason"),
    [
        (lambda p, c: paid(p, c, key=OTHER_PAYMENT_KEY), "invalid_signature"),
        (lambda p, c: paid(p, c, timestamp=int(c.timestamp()) - 3600), "expired"),
        (lambda p, c: paid(p, c, amount="1.00"), "mismatch"),
        (lambda p, c: paid(p, c, outcome="payment.failed"), "mismatch"),
        (lambda p, c: SignedPayment("evt_1", int(c.timestamp()), "v1", b"{}"), "malformed"),
    ],
    ids=["wrong-key", "expired", "amount", "failed-event", "malformed"],
)
async def test_a_bad_proof_is_refused_whoever_sends_it(
    fake: FakeWorld, clock: FixedClock, who: str, bad_proof: Any, reason: str
) -> None:
    """Staff with a bad proof is not silently comped, nor is payments let through."""
    purchase = await create(fake, fake.alice, clock)
    actor = getattr(fake, who)
    proof = bad_proof(purchase, clock)

    await refused(fulfill(fake, actor, purchase, FULFILLED, clock, proof=proof), fake, reason)

    assert fake.uow.purchase(purchase.purchase_id).state is PENDING


async def test_no_key_configured_refuses_every_proof(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    no_keys = PaymentSignatures((), clock=clock.timestamp)
    call = fulfill(
        fake, fake.alice, purchase, FULFILLED, clock, proof=paid(purchase, clock), verifier=no_keys
    )
    await refused(call, fake, "invalid_signature")


# A repeat needs no evidence.


async def test_a_repeat_needs_no_proof_and_answers_identically(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    first = await fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=paid(purchase, clock))
    before = snapshot(fake)
    clock.advance(3600)
    verifier = CountingVerifier(PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp))

    without = await fulfill(fake, fake.alice, purchase, FULFILLED, clock, verifier=verifier)
    # A proof sent with a repeat is not even looked at.
    forged = SignedPayment("evt_x", 0, "v1,AAAA", b"not json")
    with_junk = await fulfill(
        fake, fake.alice, purchase, FULFILLED, clock, proof=forged, verifier=verifier
    )

    assert without == with_junk == first
    assert verifier.calls == []
    assert_nothing_written(fake, before)


async def test_a_conflict_is_answered_before_any_proof_is_asked_for(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await fulfill(fake, fake.alice, purchase, CANCELED, clock)
    before = snapshot(fake)

    with pytest.raises(InvalidTransition):
        await fulfill(fake, fake.alice, purchase, FULFILLED, clock)

    assert_nothing_written(fake, before)


async def test_the_proof_is_verified_once_even_when_the_update_is_retried(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(purchase.purchase_id, FAILED, now=clock(), error_msg="theirs"),
    )
    fake.uow.lose_next_transitions(1)
    verifier = CountingVerifier(PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp))
    proof = paid(purchase, clock)

    await fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=proof, verifier=verifier)

    assert len(fake.uow.transition_calls) == 2
    assert verifier.calls == [proof]
    assert fake.uow.purchase(purchase.purchase_id).state is FULFILLED


# What a proof must match.


async def test_a_payment_failed_proof_cannot_fulfil(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock, outcome="payment.failed", error_message="declined")
    call = fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=proof)
    error = await refused(call, fake, "mismatch")
    assert "payment.failed" in error.message


async def test_a_payment_succeeded_proof_cannot_fail(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    call = fulfill(fake, fake.alice, purchase, FAILED, clock, proof=paid(purchase, clock))
    await refused(call, fake, "mismatch")


@pytest.mark.parametrize("outcome", ["payment.succeeded", "payment.failed"])
async def test_any_proof_sent_with_canceled_is_a_mismatch(
    fake: FakeWorld, clock: FixedClock, outcome: str
) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock, outcome=outcome)
    await refused(
        fulfill(fake, fake.alice, purchase, CANCELED, clock, proof=proof), fake, "mismatch"
    )


async def test_a_payment_failed_proof_backs_a_reported_failure(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock, outcome="payment.failed", error_message="Card declined")

    answer = await fulfill(
        fake, fake.alice, purchase, FAILED, clock, proof=proof, error_msg="Card declined"
    )

    assert answer.purchase.state is FAILED
    event = last_event(fake, purchase)
    assert event.backing is Backing.PAYMENT_EVENT
    assert event.payment_ref == ref_of(proof)
    assert event.error_msg == "Card declined"
    assert fake.uow.payment_ref_of(purchase.purchase_id) is None  # only fulfilments hold one


async def test_a_buyer_reports_a_failure_or_cancels_without_a_proof(
    fake: FakeWorld, clock: FixedClock
) -> None:
    failing = await create(fake, fake.alice, clock)
    canceling = await create(fake, fake.alice, clock, course="sql-fundamentals")

    await fulfill(fake, fake.alice, failing, FAILED, clock, error_msg="Card declined")
    await fulfill(fake, fake.alice, canceling, CANCELED, clock)

    failed, canceled = last_event(fake, failing), last_event(fake, canceling)
    assert (failed.to_state, failed.backing, failed.error_msg) == (FAILED, None, "Card declined")
    assert (canceled.to_state, canceled.backing, canceled.error_msg) == (CANCELED, None, None)


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("amount", "49.01"),
        ("amount", "4900"),
        ("amount", "0.49"),
        ("currency", "EUR"),
    ],
)
async def test_amount_and_currency_must_be_the_purchases_as_stored(
    fake: FakeWorld, clock: FixedClock, change: str, value: str
) -> None:
    purchase = await create(fake, fake.alice, clock)
    proof = paid(purchase, clock, **changed(change, value))
    call = fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=proof)
    error = await refused(call, fake, "mismatch")
    assert "amount or currency" in error.message


async def test_a_proof_for_another_purchase_is_a_mismatch(
    fake: FakeWorld, clock: FixedClock
) -> None:
    first = await create(fake, fake.alice, clock)
    second = await create(fake, fake.alice, clock)  # the same course, the same price
    proof = paid(first, clock)

    call = fulfill(fake, fake.alice, second, FULFILLED, clock, proof=proof)
    error = await refused(call, fake, "mismatch")

    assert "another purchase" in error.message
    assert fake.uow.purchase(first.purchase_id).state is PENDING


async def test_a_payment_that_fulfilled_another_purchase_is_reused(
    fake: FakeWorld, clock: FixedClock
) -> None:
    first = await create(fake, fake.alice, clock)
    await fulfill(
        fake, fake.payments, first, FULFILLED, clock, proof=paid(first, clock, payment_ref="pi_1")
    )
    second = await create(fake, fake.bob, clock)

    # A new event (new id, signed for the second purchase) naming the same payment.
    proof = paid(second, clock, payment_ref="pi_1")
    await refused(fulfill(fake, fake.bob, second, FULFILLED, clock, proof=proof), fake, "reused")

    assert fake.uow.purchase(second.purchase_id).state is PENDING
    assert fake.uow.payment_ref_of(first.purchase_id) == "pi_1"


async def test_a_payment_used_by_a_concurrent_fulfilment_is_reused(
    fake: FakeWorld, clock: FixedClock
) -> None:
    """The check passed, then another purchase took the payment before our UPDATE: the
    UNIQUE constraint refuses ours and nothing of ours is written."""
    mine = await create(fake, fake.alice, clock)
    theirs = await create(fake, fake.bob, clock)
    proof = paid(mine, clock, payment_ref="pi_raced")
    fake.uow.interleave(
        "purchases.transition",
        winner_moves(theirs.purchase_id, FULFILLED, now=clock(), payment_ref="pi_raced"),
    )
    events = len(fake.uow.events)
    commits = fake.uow.commits

    with pytest.raises(PaymentNotVerified) as raised:
        await fulfill(fake, fake.alice, mine, FULFILLED, clock, proof=proof)

    assert raised.value.reason == "reused"
    assert fake.uow.purchase(mine.purchase_id).state is PENDING
    assert fake.uow.payment_ref_of(theirs.purchase_id) == "pi_raced"
    assert [r.purchase_pk for r in fake.uow.registrations] == [theirs.pk]
    assert len(fake.uow.events) == events + 1  # the winner's only
    assert fake.uow.commits == commits


# The audit trail.


async def test_every_applied_change_appends_exactly_one_event(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    clock.advance()
    await fulfill(fake, fake.alice, purchase, FAILED, clock, error_msg="declined")
    clock.advance()
    await fulfill(fake, fake.alice, purchase, FAILED, clock, error_msg="again")  # a repeat
    clock.advance()
    await fulfill(fake, fake.staff, purchase, FULFILLED, clock)
    clock.advance()
    await fulfill(fake, fake.alice, purchase, FULFILLED, clock)  # a repeat
    with pytest.raises(InvalidTransition):
        await fulfill(fake, fake.alice, purchase, CANCELED, clock)

    history = fake.uow.events_of(purchase.purchase_id)
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, PENDING),
        (PENDING, FAILED),
        (FAILED, FULFILLED),
    ]
    assert [(e.actor_user_id, e.actor_scope) for e in history] == [
        (fake.alice.user_id, Scope.BUYER),
        (fake.alice.user_id, Scope.BUYER),
        (fake.staff.user_id, Scope.STAFF),
    ]
    assert [e.backing for e in history] == [None, None, Backing.STAFF_COMP]
    assert [e.error_msg for e in history] == [None, "declined", None]
    assert [e.created_at for e in history] == sorted({e.created_at for e in history})
    seqs = [e.seq for e in fake.uow.events]
    assert seqs == list(range(1, len(seqs) + 1))  # increasing, no gaps
    assert fake.uow.commits == len(fake.uow.events)  # one event per state change


APPLY_CELLS = [(current, requested) for (current, requested), step in CELLS if step is Step.APPLY]


@pytest.mark.parametrize(
    ("start", "requested"), APPLY_CELLS, ids=[f"{c}->{r}" for c, r in APPLY_CELLS]
)
async def test_each_apply_cell_records_from_and_to(
    fake: FakeWorld, clock: FixedClock, start: PurchaseState, requested: PurchaseState
) -> None:
    purchase = await create(fake, fake.alice, clock)
    if start is FAILED:
        await fulfill(fake, fake.payments, purchase, FAILED, clock, error_msg="declined")
    events = len(fake.uow.events)

    await fulfill(fake, fake.payments, purchase, requested, clock, error_msg="x")

    [event] = fake.uow.events[events:]
    assert (event.from_state, event.to_state) == (start, requested)
    assert (event.actor_user_id, event.actor_scope) == (fake.payments.user_id, Scope.PAYMENTS)
    expected = Backing.PAYMENTS_SCOPE if requested is FULFILLED else None
    assert event.backing is expected
    assert event.error_msg == ("x" if requested is FAILED else None)


# purchase.create


async def test_create_appends_a_creation_event(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)

    [event] = fake.uow.events
    assert event.purchase_pk == purchase.pk
    assert (event.from_state, event.to_state) == (None, PENDING)
    assert (event.actor_user_id, event.actor_scope) == (fake.alice.user_id, Scope.BUYER)
    assert (event.source, event.backing, event.payment_ref) == (Source.RPC, None, None)
    assert event.created_at == purchase.created_at
    assert fake.uow.commits == 1  # the purchase and its event, together


async def test_create_for_a_course_already_registered_for_is_refused(
    fake: FakeWorld, clock: FixedClock
) -> None:
    bought = await create(fake, fake.alice, clock, idempotency_key="order-1")
    await fulfill(fake, fake.alice, bought, FULFILLED, clock, proof=paid(bought, clock))
    before = snapshot(fake)

    with pytest.raises(AlreadyRegistered) as raised:
        await create(fake, fake.alice, clock)

    assert isinstance(raised.value, Conflict)
    assert raised.value.message == "You are already registered for this course"
    assert raised.value.data == {"course": "python-basics"}
    assert_nothing_written(fake, before)
    # A replay of the purchase that registered her still answers, as it did.
    replay = await create(fake, fake.alice, clock, idempotency_key="order-1")
    assert replay == fake.uow.purchase(bought.purchase_id)
    # Another course, and another buyer of the same course, are fine.
    await create(fake, fake.alice, clock, course="sql-fundamentals")
    await create(fake, fake.bob, clock)
    assert len(fake.uow.purchases) == 3


async def test_a_pending_purchase_does_not_block_another(
    fake: FakeWorld, clock: FixedClock
) -> None:
    await create(fake, fake.alice, clock)
    await create(fake, fake.alice, clock)
    assert len(fake.uow.purchases) == 2


# The payment webhook: record_payment_event.


async def test_a_webhook_payment_fulfils(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock, payment_ref="pi_hook")

    result, answer = await deliver(fake, signed, clock)

    assert result is PaymentEventResult.APPLIED
    assert answer == fake.uow.purchase(purchase.purchase_id)
    assert answer.state is FULFILLED
    assert fake.uow.payment_ref_of(purchase.purchase_id) == "pi_hook"
    assert len(fake.uow.registrations) == len(fake.uow.receipts) == 1
    event = last_event(fake, purchase)
    assert (event.actor_user_id, event.actor_scope) == (None, None)
    assert (event.source, event.backing) == (Source.WEBHOOK, Backing.PAYMENT_EVENT)
    assert (event.payment_event_id, event.payment_ref) == (signed.message_id, "pi_hook")


async def test_the_same_webhook_event_again_is_a_duplicate(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock)
    await deliver(fake, signed, clock)
    before = snapshot(fake)

    result, answer = await deliver(fake, signed, clock)

    assert result is PaymentEventResult.DUPLICATE
    assert answer == fake.uow.purchase(purchase.purchase_id)
    assert_nothing_written(fake, before)


async def test_a_webhook_event_already_applied_as_a_proof_is_a_duplicate(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock)
    await fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=signed)
    before = snapshot(fake)

    result, _ = await deliver(fake, signed, clock)

    assert result is PaymentEventResult.DUPLICATE
    assert_nothing_written(fake, before)


async def test_another_event_for_a_purchase_already_fulfilled_repeats(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await fulfill(fake, fake.payments, purchase, FULFILLED, clock)
    before = snapshot(fake)

    result, answer = await deliver(fake, paid(purchase, clock), clock)

    assert result is PaymentEventResult.REPEATED
    assert answer.state is FULFILLED
    assert_nothing_written(fake, before)


async def test_a_payment_for_a_canceled_purchase_is_a_conflict(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await fulfill(fake, fake.alice, purchase, CANCELED, clock)
    before = snapshot(fake)

    result, answer = await deliver(fake, paid(purchase, clock), clock)

    assert result is PaymentEventResult.CONFLICT
    assert answer.state is CANCELED
    assert_nothing_written(fake, before)


async def test_a_failed_payment_event_records_its_error_message(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock, outcome="payment.failed", error_message="Insufficient funds")

    result, answer = await deliver(fake, signed, clock)

    assert result is PaymentEventResult.APPLIED
    assert (answer.state, answer.error_msg) == (FAILED, "Insufficient funds")
    event = last_event(fake, purchase)
    assert (event.to_state, event.error_msg) == (FAILED, "Insufficient funds")
    assert (event.source, event.backing) == (Source.WEBHOOK, Backing.PAYMENT_EVENT)
    assert fake.uow.registrations == []
    # Another failure for a failed purchase repeats; a success then still fulfils.
    again, _ = await deliver(fake, paid(purchase, clock, outcome="payment.failed"), clock)
    assert again is PaymentEventResult.REPEATED
    succeeded, fulfilled = await deliver(fake, paid(purchase, clock), clock)
    assert (succeeded, fulfilled.state, fulfilled.error_msg) == (
        PaymentEventResult.APPLIED,
        FULFILLED,
        None,
    )


async def test_a_failed_payment_event_without_a_message_says_payment_failed(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    _, answer = await deliver(fake, paid(purchase, clock, outcome="payment.failed"), clock)
    assert answer.error_msg == "Payment failed"


async def test_a_failed_payment_after_fulfilment_is_a_conflict(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await deliver(fake, paid(purchase, clock), clock)
    result, answer = await deliver(fake, paid(purchase, clock, outcome="payment.failed"), clock)
    assert (result, answer.state) == (PaymentEventResult.CONFLICT, FULFILLED)


async def test_a_webhook_event_for_an_unknown_purchase_is_a_mismatch(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock, purchase_id="0" * 32)
    await refused(deliver(fake, signed, clock), fake, "mismatch")


@pytest.mark.parametrize(("change", "value"), [("amount", "50.00"), ("currency", "EUR")])
async def test_a_webhook_event_with_another_amount_is_a_mismatch(
    fake: FakeWorld, clock: FixedClock, change: str, value: str
) -> None:
    purchase = await create(fake, fake.alice, clock)
    signed = paid(purchase, clock, **changed(change, value))
    await refused(deliver(fake, signed, clock), fake, "mismatch")


async def test_a_webhook_event_reusing_a_payment_is_refused(
    fake: FakeWorld, clock: FixedClock
) -> None:
    first = await create(fake, fake.alice, clock)
    second = await create(fake, fake.bob, clock)
    await deliver(fake, paid(first, clock, payment_ref="pi_once"), clock)
    await refused(deliver(fake, paid(second, clock, payment_ref="pi_once"), clock), fake, "reused")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p, c: paid(p, c, key=OTHER_PAYMENT_KEY), "invalid_signature"),
        (lambda p, c: paid(p, c, timestamp=int(c.timestamp()) + 301), "expired"),
        (lambda p, c: SignedPayment("evt_1", int(c.timestamp()), "v1,!", b"{}"), "malformed"),
    ],
    ids=["wrong-key", "expired", "malformed"],
)
async def test_an_unverified_webhook_event_is_refused_before_anything_is_read(
    fake: FakeWorld, clock: FixedClock, make: Any, reason: str
) -> None:
    purchase = await create(fake, fake.alice, clock)
    opened = len(fake.uow.opened)
    await refused(deliver(fake, make(purchase, clock), clock), fake, reason)
    assert len(fake.uow.opened) == opened  # no unit of work was even opened


# purchase.events


async def history_of(
    fake: FakeWorld, actor: Actor, purchase: Purchase
) -> list[tuple[str | None, Scope | None]]:
    events = await services.list_purchase_events(fake.uow, actor, purchase_id=purchase.purchase_id)
    assert fake.uow.opened[-1] is False  # a read
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    return [(e.actor_email, e.actor_scope) for e in events]


async def test_purchase_events_hide_who_else_changed_a_buyers_purchase(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    await fulfill(fake, fake.staff, purchase, FAILED, clock, error_msg="refunded")
    await deliver(fake, paid(purchase, clock), clock)

    mine = await history_of(fake, fake.alice, purchase)
    assert mine == [
        ("alice@example.com", Scope.BUYER),
        (None, Scope.STAFF),  # the staff member's email is not the buyer's business
        (None, None),  # the webhook
    ]
    expected = [
        ("alice@example.com", Scope.BUYER),
        ("support@example.com", Scope.STAFF),
        (None, None),
    ]
    assert await history_of(fake, fake.staff, purchase) == expected
    assert await history_of(fake, fake.payments, purchase) == expected
    events = await services.list_purchase_events(
        fake.uow, fake.alice, purchase_id=purchase.purchase_id
    )
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, PENDING),
        (PENDING, FAILED),
        (FAILED, FULFILLED),
    ]
    assert all(e.actor_user_id in (None, fake.alice.user_id) for e in events)
    assert events[2].backing is Backing.PAYMENT_EVENT
    assert events[2].payment_ref == fake.uow.payment_ref_of(purchase.purchase_id)
    assert {e.purchase_id for e in events} == {purchase.purchase_id}


async def test_purchase_events_of_another_users_purchase_are_not_found(
    fake: FakeWorld, clock: FixedClock
) -> None:
    purchase = await create(fake, fake.alice, clock)
    with pytest.raises(NotFound) as raised:
        await services.list_purchase_events(fake.uow, fake.bob, purchase_id=purchase.purchase_id)
    assert raised.value.data == {"purchase_id": purchase.purchase_id}
    with pytest.raises(NotFound):
        await services.list_purchase_events(fake.uow, fake.staff, purchase_id="0" * 32)


# The proof as the verifier sees it: a re-serialised payload is another payload.


async def test_a_reserialised_payload_does_not_verify(fake: FakeWorld, clock: FixedClock) -> None:
    purchase = await create(fake, fake.alice, clock)
    original = paid(purchase, clock)
    same_meaning = json.dumps(json.loads(original.payload), indent=1, sort_keys=True)
    proof = as_signed(
        {
            "id": original.message_id,
            "timestamp": original.timestamp,
            "signature": original.signature,
            "payload": same_meaning,
        }
    )
    call = fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=proof)
    await refused(call, fake, "invalid_signature")
    # Signed as it is, the same text verifies.
    resigned = as_signed(signed_proof(same_meaning, timestamp=int(clock.timestamp())))
    await fulfill(fake, fake.alice, purchase, FULFILLED, clock, proof=resigned)
    assert fake.uow.purchase(purchase.purchase_id).state is FULFILLED


async def test_staff_can_still_cancel_or_fail_anyones_purchase(
    fake: FakeWorld, clock: FixedClock
) -> None:
    first = await create(fake, fake.alice, clock)
    second = await create(fake, fake.bob, clock)
    await fulfill(fake, fake.staff, first, CANCELED, clock)
    await fulfill(fake, fake.staff, second, FAILED, clock, error_msg="fraud")
    assert fake.uow.purchase(first.purchase_id).state is CANCELED
    assert fake.uow.purchase(second.purchase_id).error_msg == "fraud"
    assert {last_event(fake, p).actor_scope for p in (first, second)} == {Scope.STAFF}
    assert EventActor.of(fake.staff) == EventActor(fake.staff.user_id, Scope.STAFF)
