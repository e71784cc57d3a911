"""Fixtures of the unit tests: an in-memory world, a fixed clock, frontend links."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, Course
from tests.unit.fakes import FakeUnitOfWorkFactory, FixedClock

FRONTEND_URL = "https://shop.example"


@dataclass(frozen=True)
class FakeWorld:
    """Three users and two courses, committed in a fake database."""

    uow: FakeUnitOfWorkFactory
    alice: Actor
    bob: Actor
    staff: Actor
    python: Course
    sql: Course


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def links() -> FrontendLinks:
    return FrontendLinks(FRONTEND_URL)


@pytest.fixture
def fake() -> FakeWorld:
    uow = FakeUnitOfWorkFactory()
    return FakeWorld(
        uow=uow,
        alice=uow.add_user("alice@example.com"),
        bob=uow.add_user("bob@example.com"),
        staff=uow.add_user("support@example.com", is_staff=True),
        python=uow.add_course("python-basics", "Python Basics", "49.00", "USD"),
        sql=uow.add_course("sql-fundamentals", "SQL Fundamentals", "39.50", "EUR"),
    )
