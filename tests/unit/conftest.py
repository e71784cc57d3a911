"""Fixtures of the unit tests: an in-memory world, a fixed clock, frontend links, and a
payment verifier holding the test payment key whose clock is the fixed clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, Course
from rpc_server.domain.states import Scope
from rpc_server.payment_signatures import PaymentSignatures
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.fakes import FakeUnitOfWorkFactory, FixedClock

FRONTEND_URL = "https://shop.example"


@dataclass(frozen=True)
class FakeWorld:
    """Four users (two buyers, a staff member, the payment backend's service account)
    and two courses, committed in a fake database. Each actor is the holder of a token
    of the scope its name says."""

    uow: FakeUnitOfWorkFactory
    alice: Actor
    bob: Actor
    staff: Actor
    payments: Actor
    python: Course
    sql: Course


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def links() -> FrontendLinks:
    return FrontendLinks(FRONTEND_URL)


@pytest.fixture
def verifier(clock: FixedClock) -> PaymentSignatures:
    """Verifies with the key the test helpers sign with, at the fixed clock's time."""
    return PaymentSignatures((TEST_PAYMENT_KEY,), clock=clock.timestamp)


@pytest.fixture
def fake() -> FakeWorld:
    uow = FakeUnitOfWorkFactory()
    return FakeWorld(
        uow=uow,
        alice=uow.add_user("alice@example.com"),
        bob=uow.add_user("bob@example.com"),
        staff=uow.add_user("support@example.com", scope=Scope.STAFF),
        payments=uow.add_user("payments@example.com", scope=Scope.PAYMENTS),
        python=uow.add_course("python-basics", "Python Basics", "49.00", "USD"),
        sql=uow.add_course("sql-fundamentals", "SQL Fundamentals", "39.50", "EUR"),
    )
