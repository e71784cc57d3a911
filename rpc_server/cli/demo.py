"""Demo data for a first run: users with well-known tokens, courses and purchases, and a
demo payment key so that paying works with no set-up.

Idempotent: running it again creates nothing new. The demo tokens and the demo payment
key are fixed, published strings so that the README's examples work as written; they
must never be live on a server others can reach. ``rpc-server serve`` on a non-loopback
address refuses to start while they are (``--allow-demo`` overrides), and uses the demo
key only while demo tokens are live and no ``RPC_SERVER_PAYMENT_KEYS`` is set.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from decimal import Decimal

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import Source
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.payment_signatures import PaymentSignatures

# Its key bytes say what it is, so it is recognisable wherever it turns up.
DEMO_PAYMENT_KEY = (
    "whsec_"
    + base64.b64encode(b"rpc-server DEMO payment key - public, never use it in production").decode()
)


@dataclass(frozen=True)
class DemoUser:
    email: str
    token: str
    scope: Scope = Scope.BUYER


DEMO_USERS = (
    DemoUser("alice@example.com", "demo-alice"),
    DemoUser("bob@example.com", "demo-bob"),
    DemoUser("support@example.com", "demo-support", Scope.STAFF),
    # The shop's payment backend (examples/payment_provider.py plays it).
    DemoUser("payments@example.com", "demo-payments", Scope.PAYMENTS),
)

DEMO_COURSES = (
    ("python-basics", "Python Basics", Decimal("49.00"), "USD"),
    ("async-python", "Async Python in Practice", Decimal("79.00"), "USD"),
    ("sql-fundamentals", "SQL Fundamentals", Decimal("39.50"), "EUR"),
)

# (user, course, idempotency key, outcome the payment backend reports, or None)
DEMO_PURCHASES = (
    ("alice@example.com", "python-basics", "demo-1", None),
    ("alice@example.com", "async-python", "demo-2", PurchaseState.FULFILLED),
    ("bob@example.com", "sql-fundamentals", "demo-3", None),
)


async def seed_demo(uow_factory: UnitOfWorkFactory, links: FrontendLinks) -> list[DemoUser]:
    """Create the demo data if missing; return the demo users and their tokens."""
    actors = {}
    for user in DEMO_USERS:
        await services.issue_token(uow_factory, user.email, scope=user.scope, token=user.token)
        actor = await services.authenticate(uow_factory, user.token)
        assert actor is not None
        actors[user.email] = actor
    for slug, title, price, currency in DEMO_COURSES:
        await services.save_course(
            uow_factory, slug=slug, title=title, price=price, currency=currency
        )
    payments = actors["payments@example.com"]
    for email, course, key, outcome in DEMO_PURCHASES:
        purchase = await services.create_purchase(
            uow_factory, actors[email], course=course, idempotency_key=key, source=Source.CLI
        )
        if outcome is not None:
            # The payment backend reports the payment (a payments-scope token needs no proof).
            await services.fulfill_purchase(
                uow_factory,
                payments,
                links,
                purchase_id=purchase.purchase_id,
                purchase_state=outcome,
                verifier=PaymentSignatures(()),
                source=Source.CLI,
            )
    return list(DEMO_USERS)


async def live_demo_tokens(uow_factory: UnitOfWorkFactory) -> list[DemoUser]:
    """The demo users whose well-known token still works on this database."""
    return [
        user
        for user in DEMO_USERS
        if await services.authenticate(uow_factory, user.token) is not None
    ]
