"""Exactly one registration and one receipt per purchase, however many calls race."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.states import PurchaseState
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from tests.conftest import FRONTEND_URL, World


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_fifty_concurrent_fulfills_have_one_winner(
    uow_factory: SqlAlchemyUnitOfWorkFactory, engine: AsyncEngine, world: World
) -> None:
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    links = FrontendLinks(FRONTEND_URL)
    answers = await asyncio.gather(
        *(
            services.fulfill_purchase(
                uow_factory,
                world.alice.actor,
                links,
                purchase_id=purchase.purchase_id,
                purchase_state=PurchaseState.FULFILLED,
            )
            for _ in range(50)
        )
    )
    assert len(set(answers)) == 1
    assert answers[0].purchase.state is PurchaseState.FULFILLED
    assert await count(engine, "course_registrations") == 1
    assert await count(engine, "receipt_outbox") == 1


async def test_racing_outcomes_leave_one_consistent_state(
    uow_factory: SqlAlchemyUnitOfWorkFactory, engine: AsyncEngine, world: World
) -> None:
    """fulfilled and canceled requested at once: one wins, the other is a conflict."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    links = FrontendLinks(FRONTEND_URL)
    requested = [PurchaseState.FULFILLED, PurchaseState.CANCELED] * 10
    results = await asyncio.gather(
        *(
            services.fulfill_purchase(
                uow_factory,
                world.alice.actor,
                links,
                purchase_id=purchase.purchase_id,
                purchase_state=state,
            )
            for state in requested
        ),
        return_exceptions=True,
    )
    final = await services.get_purchase(
        uow_factory, world.alice.actor, purchase_id=purchase.purchase_id
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, Exception)]
    assert {w.purchase.state for w in winners} == {final.state}
    assert len(winners) == 10 and len(losers) == 10
    assert all(type(e).__name__ == "InvalidTransition" for e in losers)
    expected = 1 if final.state is PurchaseState.FULFILLED else 0
    assert await count(engine, "course_registrations") == expected
    assert await count(engine, "receipt_outbox") == expected
