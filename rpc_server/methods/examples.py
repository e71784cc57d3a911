"""Example values for the OpenRPC document: one call per method.

Results are domain records; the document dumps them through each method's own result
schema, so an example can never disagree with the schema it illustrates.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import (
    Backing,
    Course,
    Fulfillment,
    Purchase,
    PurchaseEventRecord,
    PurchasePage,
    Registration,
    RegistrationPage,
    Source,
)
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.jsonrpc.registry import Example

_CREATED = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
_FULFILLED = datetime(2026, 11, 27, 9, 31, tzinfo=UTC)
PURCHASE_ID = "3af4a6620783c7ae9fa021be9aad7835"

COURSES = [
    Course(1, "async-python", "Async Python in Practice", Decimal("79.00"), "USD"),
    Course(2, "python-basics", "Python Basics", Decimal("49.00"), "USD"),
]
PENDING = Purchase(
    pk=41, purchase_id=PURCHASE_ID, owner_id=7, owner_email="alice@example.com",
    course_pk=2, course_slug="python-basics", course_title="Python Basics",
    amount=Decimal("49.00"), currency="USD", state=PurchaseState.PENDING, error_msg=None,
    created_at=_CREATED, updated_at=_CREATED, fulfilled_at=None,
)  # fmt: skip
FULFILLED = replace(
    PENDING, state=PurchaseState.FULFILLED, updated_at=_FULFILLED, fulfilled_at=_FULFILLED
)

COURSE_LIST = Example("the courses on sale", {}, COURSES)
PURCHASE_CREATE = Example(
    "buy a course, retry-safe",
    {"course": "python-basics", "idempotency_key": "order-1001"},
    PENDING,
)
PURCHASE_GET = Example("one purchase", {"purchase_id": PURCHASE_ID}, PENDING)
PURCHASE_LIST = Example(
    "the first page of pending purchases",
    {"state": "pending", "limit": 1},
    PurchasePage(items=[PENDING], next_before=PENDING.pk),
)
# What the payment step hands the browser: a payment event signed by the shop's
# payment backend (Standard Webhooks v1; this signature is illustrative).
PAYMENT_PAYLOAD = (
    '{"type": "payment.succeeded", "data": {"purchase_id": "' + PURCHASE_ID + '", '
    '"amount": "49.00", "currency": "USD", "payment_ref": "pi_3PqR7s"}}'
)
PURCHASE_FULFILL = Example(
    "the payment went through: fulfil with the signed payment event",
    {
        "purchase_id": PURCHASE_ID,
        "purchase_state": "fulfilled",
        "payment_proof": {
            "id": "evt_2KWPBgLlAfxdpx2AI54pPJ85f4W",
            "timestamp": 1795771860,
            "signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
            "payload": PAYMENT_PAYLOAD,
        },
    },
    Fulfillment(
        redirect_url=FrontendLinks("https://shop.example").after_fulfillment(FULFILLED),
        purchase=FULFILLED,
    ),
)
REGISTRATION = Registration(
    pk=12, course_slug="python-basics", purchase_id=PURCHASE_ID, created_at=_FULFILLED
)
REGISTRATION_LIST = Example(
    "the first page of the caller's registrations",
    {"limit": 1},
    RegistrationPage(items=[REGISTRATION], next_before=REGISTRATION.pk),
)
PURCHASE_EVENTS = Example(
    "a purchase's history",
    {"purchase_id": PURCHASE_ID},
    [
        PurchaseEventRecord(
            seq=1041,
            purchase_id=PURCHASE_ID,
            from_state=None,
            to_state=PurchaseState.PENDING,
            actor_user_id=7,
            actor_email="alice@example.com",
            actor_scope=Scope.BUYER,
            source=Source.RPC,
            backing=None,
            payment_ref=None,
            error_msg=None,
            created_at=_CREATED,
        ),
        PurchaseEventRecord(
            seq=1042,
            purchase_id=PURCHASE_ID,
            from_state=PurchaseState.PENDING,
            to_state=PurchaseState.FULFILLED,
            actor_user_id=None,
            actor_email=None,
            actor_scope=None,
            source=Source.WEBHOOK,
            backing=Backing.PAYMENT_EVENT,
            payment_ref="pi_3PqR7s",
            error_msg=None,
            created_at=_FULFILLED,
        ),
    ],
)

PURCHASE_SUBSCRIBE = Example(
    "follow one purchase, from the last change seen",
    {"purchase_id": PURCHASE_ID, "since": 1041},
    "9f86d081884c7d659a2feaa0c55ad015",
)
