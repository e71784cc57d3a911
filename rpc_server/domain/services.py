"""Domain services: one function per use case, each one unit of work.

Called by the thin method handlers with already-validated arguments; raise the errors
of ``rpc_server.domain.errors``. Argument names match the params of the JSON-RPC
methods so that handlers can pass loaded params straight through.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from rpc_server.domain.errors import (
    AlreadyRegistered,
    IdempotencyKeyReused,
    InvalidArgument,
    InvalidTransition,
    NotFound,
    PaymentNotVerified,
    TooManyPendingPurchases,
)
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.outbox import OutboxOverview, OutboxStatus, ReceiptBacklog
from rpc_server.domain.ports import PaymentVerifier, UnitOfWork, UnitOfWorkFactory
from rpc_server.domain.records import (
    WEBHOOK_ACTOR,
    Actor,
    Backing,
    Course,
    EventActor,
    Fulfillment,
    NewPurchaseEvent,
    PaymentEvent,
    PaymentOutcome,
    Purchase,
    PurchaseEventRecord,
    PurchasePage,
    PurchaseUpdate,
    RegistrationPage,
    SignedPayment,
    Source,
    UpdateScope,
)
from rpc_server.domain.states import Evidence, PurchaseState, Scope, Step, evidence_for, step_for
from rpc_server.domain.tokens import hash_token, new_token

Clock = Callable[[], datetime]
# What a signed payment.failed event without an error_message records.
FAILED_PAYMENT = "Payment failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_purchase_id() -> str:
    """Return an unguessable public id: 128 random bits as 32 characters of [0-9a-f]."""
    return secrets.token_hex(16)


def _visible_owner(actor: Actor) -> int | None:
    """Staff and the payment backend see every purchase; buyers only their own."""
    return None if actor.sees_every_purchase else actor.user_id


async def authenticate(
    uow_factory: UnitOfWorkFactory, token: str, *, clock: Clock = utcnow
) -> Actor | None:
    """Return who holds ``token``, or None for an unknown, expired or revoked token."""
    async with uow_factory() as uow:
        return await uow.users.find_actor(hash_token(token), now=clock())


async def issue_token(
    uow_factory: UnitOfWorkFactory,
    email: str,
    *,
    scope: Scope | None = None,
    is_staff: bool = False,
    token: str | None = None,
    expires_in: timedelta | None = None,
    clock: Clock = utcnow,
) -> str:
    """Create the user if needed and return a new token of ``scope`` for it (shown once).

    ``is_staff=True`` is short for ``scope=Scope.STAFF``; the default is a buyer token.
    Issuing a token changes no other token and no existing user. ``token`` fixes the
    token's value (used only for the well-known demo tokens); issuing a fixed token
    that is already stored is a no-op that returns it.
    """
    scope = scope or (Scope.STAFF if is_staff else Scope.BUYER)
    token = token or new_token()
    async with uow_factory(write=True) as uow:
        now = clock()
        user_id = await uow.users.ensure_user(email, is_staff=scope is Scope.STAFF, now=now)
        expires_at = None if expires_in is None else now + expires_in
        await uow.users.add_token(
            user_id, hash_token(token), scope=scope, now=now, expires_at=expires_at
        )
        await uow.commit()
    return token


async def revoke_token(
    uow_factory: UnitOfWorkFactory, token: str, *, clock: Clock = utcnow
) -> bool:
    """Revoke a token at once; False if it was unknown or already revoked."""
    async with uow_factory(write=True) as uow:
        revoked = await uow.users.revoke_token(hash_token(token), now=clock())
        await uow.commit()
    return revoked


async def revoke_tokens_of(
    uow_factory: UnitOfWorkFactory, email: str, *, clock: Clock = utcnow
) -> int:
    """Revoke every live token of a user (a lost laptop); return how many."""
    async with uow_factory(write=True) as uow:
        revoked = await uow.users.revoke_tokens_of(email, now=clock())
        await uow.commit()
    return revoked


async def save_course(
    uow_factory: UnitOfWorkFactory, *, slug: str, title: str, price: Decimal, currency: str
) -> Course:
    """Create a course, or update the course with this slug (an operator's action)."""
    async with uow_factory(write=True) as uow:
        course = await uow.courses.save(slug=slug, title=title, price=price, currency=currency)
        await uow.commit()
    return course


async def list_courses(uow_factory: UnitOfWorkFactory) -> list[Course]:
    async with uow_factory() as uow:
        return await uow.courses.list_all()


async def create_purchase(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    *,
    course: str,
    idempotency_key: str | None = None,
    source: Source = Source.RPC,
    max_pending: int | None = None,
    clock: Clock = utcnow,
) -> Purchase:
    """Create a pending purchase of ``course`` for the actor.

    With an ``idempotency_key``, a repeated call returns the purchase the first call
    created and creates nothing. Raises NotFound for an unknown course,
    IdempotencyKeyReused when the key was used for another course, AlreadyRegistered
    when the actor is already registered for the course, and TooManyPendingPurchases
    when the actor already holds ``max_pending`` pending purchases (None: no cap).
    """
    async with uow_factory(write=True) as uow:
        if max_pending is not None:
            # First, so that the actor's creations run one at a time from here on: the
            # count below cannot race another creation (and a replay of a key that a
            # concurrent call just used finds that call's purchase).
            await uow.users.hold(actor.user_id)
        found = await uow.courses.get_by_slug(course)
        if found is None:
            raise NotFound("Course not found", {"course": course})
        if idempotency_key is not None:
            earlier = await uow.purchases.get_by_idempotency_key(actor.user_id, idempotency_key)
            if earlier is not None:
                return _replayed(earlier, course, idempotency_key)
        if await uow.registrations.exists(actor.user_id, found.pk):
            raise AlreadyRegistered(course)
        if max_pending is not None:
            pending = await uow.purchases.count_pending(actor.user_id)
            if pending >= max_pending:
                raise TooManyPendingPurchases(pending, max_pending)
        now = clock()
        created = await uow.purchases.add(
            purchase_id=new_purchase_id(),
            owner_id=actor.user_id,
            course=found,
            idempotency_key=idempotency_key,
            now=now,
        )
        if created is None:
            # A concurrent call with the same key won the race; answer as it did.
            assert idempotency_key is not None
            earlier = await uow.purchases.get_by_idempotency_key(actor.user_id, idempotency_key)
            assert earlier is not None
            return _replayed(earlier, course, idempotency_key)
        await uow.events.append(
            NewPurchaseEvent(
                purchase_pk=created.pk,
                from_state=None,
                to_state=PurchaseState.PENDING,
                actor=EventActor.of(actor),
                source=source,
            ),
            now=now,
        )
        await uow.commit()
        return created


def _replayed(earlier: Purchase, course: str, idempotency_key: str) -> Purchase:
    if earlier.course_slug != course:
        raise IdempotencyKeyReused(idempotency_key, earlier.course_slug)
    return earlier


async def get_purchase(
    uow_factory: UnitOfWorkFactory, actor: Actor, *, purchase_id: str
) -> Purchase:
    """Return one purchase the actor may see; NotFound otherwise (ids cannot be probed)."""
    async with uow_factory() as uow:
        purchase = await uow.purchases.get(purchase_id, owner_id=_visible_owner(actor))
    if purchase is None:
        raise NotFound("Purchase not found", {"purchase_id": purchase_id})
    return purchase


async def list_purchases(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    *,
    state: PurchaseState | None = None,
    limit: int = 20,
    cursor: int | None = None,
) -> PurchasePage:
    """Return a page of purchases newest first, continuing before ``cursor``."""
    async with uow_factory() as uow:
        rows = await uow.purchases.list_page(
            owner_id=_visible_owner(actor), state=state, limit=limit + 1, before=cursor
        )
    items = rows[:limit]
    next_before = items[-1].pk if len(rows) > limit else None
    return PurchasePage(items=items, next_before=next_before)


@dataclass(frozen=True, slots=True)
class _Approval:
    """Why a change may be applied: what the audit row records as its backing."""

    backing: Backing | None
    payment_event: PaymentEvent | None = None


Approve = Callable[[Purchase], Awaitable[_Approval]]


async def fulfill_purchase(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    links: FrontendLinks,
    *,
    purchase_id: str,
    purchase_state: PurchaseState,
    error_msg: str | None = None,
    payment_proof: SignedPayment | None = None,
    verifier: PaymentVerifier,
    source: Source = Source.RPC,
    clock: Clock = utcnow,
) -> Fulfillment:
    """Apply the outcome of a payment to a purchase, following ``states.TRANSITIONS``.

    Only a change the state machine applies needs evidence (``states.OUTCOME_EVIDENCE``):
    a buyer fulfils only with a ``payment_proof`` that verifies and matches the purchase
    as stored; a payments-scope caller needs none; staff without one record a comp. A
    proof, when given, is always checked and must match the outcome asked for; a
    ``payment.failed`` proof records its own ``error_message``, not ``error_msg``.
    Fulfilling creates the course registration and the receipt outbox row, and every
    change its audit event, in the same transaction. Repeating a request answers
    exactly as before and changes nothing (a REPEAT needs no evidence).
    ``error_msg`` is recorded only when the purchase becomes ``failed``.
    Raises NotFound (unknown or not visible), InvalidTransition (409) and
    PaymentNotVerified (nothing written).
    """
    owner = _visible_owner(actor)
    needed = evidence_for(actor.scope, purchase_state)
    verified: list[PaymentEvent] = []  # the proof, verified at most once

    async def approve(purchase: Purchase) -> _Approval:
        if payment_proof is not None:
            if not verified:
                verified.append(verifier.verify(payment_proof))
            await _check_event_fits(uow, verified[0], purchase, purchase_state)
            return _Approval(Backing.PAYMENT_EVENT, verified[0])
        if needed is Evidence.PROOF:
            raise PaymentNotVerified(
                "missing",
                "fulfilling a purchase needs a payment_proof (the signed payment event "
                "the payment step returned)",
            )
        if needed is Evidence.PROOF_OR_COMP:
            return _Approval(Backing.STAFF_COMP)
        if purchase_state is PurchaseState.FULFILLED:
            return _Approval(Backing.PAYMENTS_SCOPE)
        return _Approval(None)

    # Read before the write transaction: the change is conditional on the state read
    # (``_request_state``), so a purchase changed in between is read again inside it.
    # A repeat, a conflict or a refusal then opens no transaction at all, and a change
    # holds the write lock (SQLite's, or the row's) for its writes only.
    async with uow_factory() as uow:
        seen = await uow.purchases.get(purchase_id, owner_id=owner)
    if seen is None:
        raise NotFound("Purchase not found", {"purchase_id": purchase_id})
    async with uow_factory(write=True) as uow:
        purchase, step = await _request_state(
            uow,
            seen,
            purchase_state,
            approve=approve,
            actor=EventActor.of(actor),
            source=source,
            error_msg=error_msg,
            owner=owner,
            clock=clock,
        )
    if step is Step.CONFLICT:
        raise InvalidTransition(purchase.state, purchase_state)
    return Fulfillment(redirect_url=links.after_fulfillment(purchase), purchase=purchase)


class PaymentEventResult(StrEnum):
    """What a payment event delivered to the webhook did."""

    APPLIED = "applied"  # it changed the purchase
    REPEATED = "repeated"  # the purchase was already in the state it asks for
    DUPLICATE = "duplicate"  # this event id already changed the purchase
    CONFLICT = "conflict"  # the purchase can no longer take that state (for example canceled)


async def record_payment_event(
    uow_factory: UnitOfWorkFactory,
    verifier: PaymentVerifier,
    signed: SignedPayment,
    *,
    clock: Clock = utcnow,
) -> tuple[PaymentEventResult, Purchase]:
    """Apply a signed payment event delivered by the payment backend (the webhook).

    ``payment.succeeded`` fulfils, ``payment.failed`` fails with its ``error_message``,
    through the same state machine and checks as ``fulfill_purchase`` with a proof;
    whichever of the two arrives first applies and the others repeat.
    Raises PaymentNotVerified: ``malformed``, ``invalid_signature`` and ``expired``
    before anything is read; ``mismatch`` (unknown purchase, other amount or currency)
    and ``reused`` after. Nothing is written then.
    """
    event = verifier.verify(signed)
    requested = event.outcome.requested_state

    async def approve(purchase: Purchase) -> _Approval:
        await _check_event_fits(uow, event, purchase, requested)
        return _Approval(Backing.PAYMENT_EVENT, event)

    async with uow_factory(write=True) as uow:
        # The event first, the purchase after: read in this order, a purchase changed by
        # this event in a transaction that committed meanwhile (READ COMMITTED) is read
        # as it is now, never as it was before the event applied.
        duplicate = await uow.events.payment_event_applied(event.event_id)
        purchase = await uow.purchases.get(event.purchase_id, owner_id=None)
        if purchase is None:
            raise PaymentNotVerified("mismatch", "the payment event is for an unknown purchase")
        if duplicate:
            return PaymentEventResult.DUPLICATE, purchase
        purchase, step = await _request_state(
            uow,
            purchase,
            requested,
            approve=approve,
            actor=WEBHOOK_ACTOR,
            source=Source.WEBHOOK,
            error_msg=None,
            owner=None,
            clock=clock,
        )
    results = {
        Step.APPLY: PaymentEventResult.APPLIED,
        Step.REPEAT: PaymentEventResult.REPEATED,
        Step.CONFLICT: PaymentEventResult.CONFLICT,
    }
    return results[step], purchase


async def _check_event_fits(
    uow: UnitOfWork, event: PaymentEvent, purchase: Purchase, requested: PurchaseState
) -> None:
    """Raise PaymentNotVerified unless ``event`` pays for ``purchase`` as stored and
    asks for ``requested``, with a payment no other purchase was fulfilled with."""
    if event.purchase_id != purchase.purchase_id:
        raise PaymentNotVerified("mismatch", "the payment event is for another purchase")
    if event.outcome.requested_state is not requested:
        raise PaymentNotVerified(
            "mismatch", f"a {event.outcome} event cannot make a purchase {requested}"
        )
    if event.amount != purchase.amount or event.currency != purchase.currency:
        raise PaymentNotVerified(
            "mismatch", "the payment's amount or currency is not the purchase's"
        )
    if event.outcome is PaymentOutcome.SUCCEEDED:
        holder = await uow.purchases.holder_of_payment_ref(event.payment_ref)
        if holder is not None and holder != purchase.pk:
            raise PaymentNotVerified("reused", "this payment already fulfilled another purchase")


async def _request_state(
    uow: UnitOfWork,
    purchase: Purchase,
    requested: PurchaseState,
    *,
    approve: Approve,
    actor: EventActor,
    source: Source,
    error_msg: str | None,
    owner: int | None,
    clock: Clock,
) -> tuple[Purchase, Step]:
    """Move ``purchase`` to ``requested`` if the state machine says APPLY and ``approve``
    does not raise; commit the change with its side effects and its audit event.

    Returns the purchase as the database holds it afterwards and the step taken for
    the state it was last seen in. The change is conditional on the state read, so a
    concurrent change makes it miss; the purchase is then read again and the table
    consulted again. Each lost race moves the purchase on, so this ends.
    """
    for _attempt in range(len(PurchaseState)):
        step = step_for(purchase.state, requested)
        if step is not Step.APPLY:
            return purchase, step
        approval = await approve(purchase)
        event = approval.payment_event
        message = None
        if requested is PurchaseState.FAILED:
            # A signed payment.failed event's own message wins, however it came in.
            message = event.error_message or FAILED_PAYMENT if event is not None else error_msg
        now = clock()
        change = await uow.purchases.transition(
            purchase.pk,
            sources=frozenset({purchase.state}),
            target=requested,
            error_msg=message,
            payment_ref=(
                event.payment_ref
                if event is not None and requested is PurchaseState.FULFILLED
                else None
            ),
            now=now,
        )
        if change is not None:
            refreshed = change.applied_to(purchase)
            if requested is PurchaseState.FULFILLED:
                await uow.registrations.add(refreshed, now=now)
                await uow.receipts.add(refreshed, now=now)
            await uow.events.append(
                NewPurchaseEvent(
                    purchase_pk=purchase.pk,
                    from_state=purchase.state,
                    to_state=requested,
                    actor=actor,
                    source=source,
                    backing=approval.backing,
                    payment_event_id=None if event is None else event.event_id,
                    payment_ref=None if event is None else event.payment_ref,
                    error_msg=message,
                ),
                now=now,
            )
            await uow.commit()
            return refreshed, step
        # Lost a race: read what the winner left, and consult the table again.
        found = await uow.purchases.get(purchase.purchase_id, owner_id=owner)
        assert found is not None
        purchase = found
    raise AssertionError("a purchase changed state more often than it has states")


async def list_purchase_events(
    uow_factory: UnitOfWorkFactory, actor: Actor, *, purchase_id: str
) -> list[PurchaseEventRecord]:
    """Return the history of a purchase the actor may see, oldest first.

    Who made a change is shown by email only to staff and the payment backend, and to
    a buyer for their own changes; otherwise only the actor's scope is shown.
    """
    async with uow_factory() as uow:
        purchase = await uow.purchases.get(purchase_id, owner_id=_visible_owner(actor))
        if purchase is None:
            raise NotFound("Purchase not found", {"purchase_id": purchase_id})
        events = await uow.events.list_for(purchase.pk)
    return [event_as_seen_by(actor, event) for event in events]


def event_as_seen_by(actor: Actor, event: PurchaseEventRecord) -> PurchaseEventRecord:
    """The event as ``actor`` may see it: who made it by email only to staff and the
    payment backend, and to a buyer for their own changes; otherwise only its scope."""
    if actor.sees_every_purchase or event.actor_user_id in (None, actor.user_id):
        return event
    return replace(event, actor_user_id=None, actor_email=None)


async def update_scope(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    *,
    purchase_id: str | None = None,
    since: int | None = None,
) -> tuple[UpdateScope, int]:
    """Which updates ``actor`` may follow (one purchase, or all it may see, as
    ``purchase.list``), and the latest event's sequence number.

    Raises NotFound for a purchase the actor cannot see, InvalidArgument for a ``since``
    after the latest event (a sequence number this server never gave out).
    """
    async with uow_factory() as uow:
        owner_id = _visible_owner(actor)
        scope = UpdateScope(owner_id=owner_id)
        if purchase_id is not None:
            purchase = await uow.purchases.get(purchase_id, owner_id=owner_id)
            if purchase is None:
                raise NotFound("Purchase not found", {"purchase_id": purchase_id})
            scope = UpdateScope(owner_id=owner_id, purchase_pk=purchase.pk)
        latest = await uow.events.latest_seq()
    if since is not None and since > latest:
        raise InvalidArgument(
            "Invalid params: since is after the latest event",
            {"since": since, "latest_seq": latest},
        )
    return scope, latest


async def latest_event_seq(uow_factory: UnitOfWorkFactory) -> int:
    """The sequence number of the latest purchase event (0: none yet)."""
    async with uow_factory() as uow:
        return await uow.events.latest_seq()


async def purchase_updates(
    uow_factory: UnitOfWorkFactory,
    after: int,
    scope: UpdateScope,
    *,
    upto: int | None = None,
    limit: int = 500,
) -> list[PurchaseUpdate]:
    """The updates after sequence number ``after`` (up to ``upto``) in ``scope``, oldest
    first, at most ``limit``; events as they are stored (``event_as_seen_by`` hides what
    a viewer may not see)."""
    async with uow_factory() as uow:
        return await uow.events.updates_after(after, scope, upto=upto, limit=limit)


async def list_registrations(
    uow_factory: UnitOfWorkFactory, actor: Actor, *, limit: int = 20, cursor: int | None = None
) -> RegistrationPage:
    """Return a page of the actor's own course registrations newest first, continuing
    before ``cursor``."""
    async with uow_factory() as uow:
        rows = await uow.registrations.list_page(actor.user_id, limit=limit + 1, before=cursor)
    items = rows[:limit]
    next_before = items[-1].pk if len(rows) > limit else None
    return RegistrationPage(items=items, next_before=next_before)


# --- the receipt outbox, for the operator (rpc-server mail-status, mail-retry) ----------


async def outbox_overview(uow_factory: UnitOfWorkFactory, *, limit: int) -> OutboxOverview:
    """How many receipts are in each status, and the newest ``limit`` of them."""
    # A read unit of work: the counts and the list are two snapshots, which may differ
    # by a message settled in between; an overview does not need to hold the write lock.
    async with uow_factory() as uow:
        counts = await uow.receipts.counts()
        entries = await uow.receipts.overview(limit=limit)
    return OutboxOverview(
        counts={status: counts.get(status, 0) for status in OutboxStatus}, entries=entries
    )


async def receipt_backlog(uow_factory: UnitOfWorkFactory) -> ReceiptBacklog:
    """The receipts not sent, for the metrics (``rpc_server.observability.metrics``)."""
    async with uow_factory() as uow:
        return await uow.receipts.backlog()


async def requeue_receipt(
    uow_factory: UnitOfWorkFactory, outbox_id: int, *, clock: Clock = utcnow
) -> OutboxStatus | None:
    """Put a dead receipt back in the queue, due now with fresh attempts.

    Returns None once requeued; otherwise the status that kept it as it was (only dead
    messages are requeued). Raises ``NotFound`` if there is no such message.
    """
    async with uow_factory(write=True) as uow:
        if await uow.receipts.requeue(outbox_id, now=clock()):
            await uow.commit()
            return None
        status = await uow.receipts.status_of(outbox_id)
    if status is None:
        raise NotFound("No such message", {"outbox_id": outbox_id})
    return status
