"""Frozen records the domain works with and the method layer serializes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from rpc_server.domain.states import SEES_EVERY_PURCHASE, PurchaseState, Scope


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: resolved from a bearer token before any method runs.

    ``scope`` is the token's, not the user's: one user may hold tokens of several scopes.
    """

    user_id: int
    email: str
    scope: Scope = Scope.BUYER
    # When the token presented expires (None: never); no cache trusts it past then.
    token_expires_at: datetime | None = field(default=None, compare=False)

    @property
    def is_staff(self) -> bool:
        return self.scope is Scope.STAFF

    @property
    def sees_every_purchase(self) -> bool:
        """Staff and the payment backend act on every user's purchases."""
        return self.scope in SEES_EVERY_PURCHASE


@dataclass(frozen=True, slots=True)
class Course:
    pk: int
    slug: str
    title: str
    price: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class Purchase:
    pk: int
    purchase_id: str
    owner_id: int
    owner_email: str
    course_pk: int
    course_slug: str
    course_title: str
    amount: Decimal
    currency: str
    state: PurchaseState
    error_msg: str | None
    created_at: datetime
    updated_at: datetime
    fulfilled_at: datetime | None


@dataclass(frozen=True, slots=True)
class StateChange:
    """What a purchase's transition wrote (``PurchaseRepository.transition``), as the
    database holds it: the rest of the purchase is as it was."""

    state: PurchaseState
    error_msg: str | None
    updated_at: datetime
    fulfilled_at: datetime | None

    def applied_to(self, purchase: Purchase) -> Purchase:
        return replace(
            purchase,
            state=self.state,
            error_msg=self.error_msg,
            updated_at=self.updated_at,
            fulfilled_at=self.fulfilled_at,
        )


@dataclass(frozen=True, slots=True)
class Registration:
    pk: int
    course_slug: str
    purchase_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PurchasePage:
    """One page of purchases, newest first; ``next_before`` is the keyset for the next."""

    items: list[Purchase]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class RegistrationPage:
    """One page of registrations, newest first; ``next_before`` is the keyset for the next."""

    items: list[Registration]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Fulfillment:
    """The answer to a fulfillment request: where to send the buyer, and the purchase."""

    redirect_url: str
    purchase: Purchase


class Source(StrEnum):
    """Which way a state change came in."""

    RPC = "rpc"
    WEBHOOK = "webhook"
    CLI = "cli"
    MIGRATION = "migration"  # the state a purchase was in when its history began


class Backing(StrEnum):
    """Why a fulfilment (or a reported failure) was accepted, as the audit trail says."""

    PAYMENT_EVENT = "payment_event"  # a verified signed payment event (proof or webhook)
    PAYMENTS_SCOPE = "payments_scope"  # a payments-scope token: the provider's word
    STAFF_COMP = "staff_comp"  # staff fulfilled it without a payment


class PaymentOutcome(StrEnum):
    """The ``type`` of a payment event and the purchase state each one asks for."""

    SUCCEEDED = "payment.succeeded"
    FAILED = "payment.failed"

    @property
    def requested_state(self) -> PurchaseState:
        if self is PaymentOutcome.SUCCEEDED:
            return PurchaseState.FULFILLED
        return PurchaseState.FAILED


@dataclass(frozen=True, slots=True)
class SignedPayment:
    """A signed payment event as it arrived (Standard Webhooks): not yet verified.

    ``message_id``, ``timestamp`` and ``signature`` are the ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature`` headers; ``payload`` is the body
    exactly as signed.
    """

    message_id: str
    timestamp: int
    signature: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """A payment event whose signature and timestamp have been verified."""

    event_id: str
    outcome: PaymentOutcome
    purchase_id: str
    amount: Decimal
    currency: str
    payment_ref: str
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class EventActor:
    """Who made a state change: a user through a token of some scope, or (both None)
    the payment webhook."""

    user_id: int | None
    scope: Scope | None

    @classmethod
    def of(cls, actor: Actor) -> EventActor:
        return cls(actor.user_id, actor.scope)


WEBHOOK_ACTOR = EventActor(None, None)


@dataclass(frozen=True, slots=True)
class NewPurchaseEvent:
    """A state change to append to a purchase's history (``seq`` is assigned on append)."""

    purchase_pk: int
    from_state: PurchaseState | None
    to_state: PurchaseState
    actor: EventActor
    source: Source
    backing: Backing | None = None
    payment_event_id: str | None = None
    payment_ref: str | None = None
    error_msg: str | None = None


@dataclass(frozen=True, slots=True)
class PurchaseEventRecord:
    """One entry of a purchase's history, as ``purchase.events`` shows it."""

    seq: int
    purchase_id: str
    from_state: PurchaseState | None
    to_state: PurchaseState
    actor_user_id: int | None
    actor_email: str | None
    actor_scope: Scope | None
    source: Source
    backing: Backing | None
    payment_ref: str | None
    error_msg: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PurchaseUpdate:
    """One state change as a live subscriber receives it: the event, and the purchase it
    changed as it is now (``purchase.get``'s view; it may have moved on since)."""

    event: PurchaseEventRecord
    purchase: Purchase

    @property
    def seq(self) -> int:
        return self.event.seq


@dataclass(frozen=True, slots=True)
class UpdateScope:
    """Which purchases' updates a subscriber receives: ``purchase_pk`` alone, or every
    purchase of ``owner_id``, or (both None) every purchase."""

    owner_id: int | None = None
    purchase_pk: int | None = None

    def covers(self, purchase: Purchase) -> bool:
        if self.purchase_pk is not None:
            return purchase.pk == self.purchase_pk
        return self.owner_id is None or purchase.owner_id == self.owner_id
