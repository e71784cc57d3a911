"""Frozen records the domain works with and the method layer serializes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from rpc_server.domain.states import PurchaseState


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: resolved from a bearer token before any method runs."""

    user_id: int
    email: str
    is_staff: bool


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
class Registration:
    course_slug: str
    purchase_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PurchasePage:
    """One page of purchases, newest first; ``next_before`` is the keyset for the next."""

    items: list[Purchase]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Fulfillment:
    """The answer to a fulfillment request: where to send the buyer, and the purchase."""

    redirect_url: str
    purchase: Purchase
