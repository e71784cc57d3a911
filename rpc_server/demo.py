"""Demo data for a first run: users with well-known tokens, courses and purchases.

Idempotent: running it again creates nothing new. The demo tokens are fixed strings so
that the README's curl examples work as written; never seed a production database.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.states import PurchaseState


@dataclass(frozen=True)
class DemoUser:
    email: str
    token: str
    is_staff: bool = False


DEMO_USERS = (
    DemoUser("alice@example.com", "demo-alice"),
    DemoUser("bob@example.com", "demo-bob"),
    DemoUser("support@example.com", "demo-support", is_staff=True),
)

DEMO_COURSES = (
    ("python-basics", "Python Basics", Decimal("49.00"), "USD"),
    ("async-python", "Async Python in Practice", Decimal("79.00"), "USD"),
    ("sql-fundamentals", "SQL Fundamentals", Decimal("39.50"), "EUR"),
)

# (user, course, idempotency key, outcome to apply or None to leave pending)
DEMO_PURCHASES = (
    ("alice@example.com", "python-basics", "demo-1", None),
    ("alice@example.com", "async-python", "demo-2", PurchaseState.FULFILLED),
    ("bob@example.com", "sql-fundamentals", "demo-3", None),
)


async def seed_demo(uow_factory: UnitOfWorkFactory, links: FrontendLinks) -> list[DemoUser]:
    """Create the demo data if missing; return the demo users and their tokens."""
    actors = {}
    for user in DEMO_USERS:
        await services.issue_token(
            uow_factory, user.email, is_staff=user.is_staff, token=user.token
        )
        actor = await services.authenticate(uow_factory, user.token)
        assert actor is not None
        actors[user.email] = actor
    for slug, title, price, currency in DEMO_COURSES:
        await services.save_course(
            uow_factory, slug=slug, title=title, price=price, currency=currency
        )
    for email, course, key, outcome in DEMO_PURCHASES:
        purchase = await services.create_purchase(
            uow_factory, actors[email], course=course, idempotency_key=key
        )
        if outcome is not None:
            await services.fulfill_purchase(
                uow_factory,
                actors[email],
                links,
                purchase_id=purchase.purchase_id,
                purchase_state=outcome,
            )
    return list(DEMO_USERS)
