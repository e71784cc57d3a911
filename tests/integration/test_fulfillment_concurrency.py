"""Exactly one registration, one receipt and one audit event per purchase, however many
calls race."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import PurchaseState
from tests.conftest import World
from tests.integration.paying import LINKS, VERIFIER, pay_and_fulfil, payment_for


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def events(engine: AsyncEngine) -> list[tuple[str | None, str, str | None]]:
    """(from_state, to_state, evidence) of every audit event, in seq order."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT from_state, to_state, evidence FROM purchase_events ORDER BY seq")
        )
        return [tuple(row) for row in rows]


async def test_fifty_concurrent_fulfills_have_one_winner(
    uow_factory: SqlUnitOfWorkFactory, engine: AsyncEngine, world: World
) -> None:
    """The buyer retries one payment's fulfil 25 times while the payment backend fulfils
    the same purchase 25 times (no proof needed): one change, the rest repeat it."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    payment = payment_for(purchase)
    by_buyer = (
        pay_and_fulfil(uow_factory, world.alice.actor, purchase, payment=payment) for _ in range(25)
    )
    by_backend = (
        services.fulfill_purchase(
            uow_factory,
            world.payments.actor,
            LINKS,
            purchase_id=purchase.purchase_id,
            purchase_state=PurchaseState.FULFILLED,
            verifier=VERIFIER,
        )
        for _ in range(25)
    )
    answers = await asyncio.gather(*by_buyer, *by_backend)
    assert len(set(answers)) == 1
    assert answers[0].purchase.state is PurchaseState.FULFILLED
    assert await count(engine, "course_registrations") == 1
    assert await count(engine, "receipt_outbox") == 1
    # Its creation, then the one change that won, backed by whichever call made it.
    [created, fulfilled] = await events(engine)
    assert created == (None, "pending", None)
    assert fulfilled[:2] == ("pending", "fulfilled")
    assert fulfilled[2] in ("payment_event", "payments_scope")


async def test_racing_outcomes_leave_one_consistent_state(
    uow_factory: SqlUnitOfWorkFactory, engine: AsyncEngine, world: World
) -> None:
    """fulfilled (paid) and canceled requested at once: one wins, the other is a conflict."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    payment = payment_for(purchase)
    requested = [PurchaseState.FULFILLED, PurchaseState.CANCELED] * 10
    results = await asyncio.gather(
        *(
            services.fulfill_purchase(
                uow_factory,
                world.alice.actor,
                LINKS,
                purchase_id=purchase.purchase_id,
                purchase_state=state,
                payment_proof=payment if state is PurchaseState.FULFILLED else None,
                verifier=VERIFIER,
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
    assert [e[:2] for e in await events(engine)] == [(None, "pending"), ("pending", final.state)]
