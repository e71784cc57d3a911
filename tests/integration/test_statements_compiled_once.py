"""Every statement is built once, at import, and so compiled once.

``StatementCache`` keeps compiled forms per statement object; a statement built inside a
repository method would be a new object on every call, compiled every time (about 325 µs
each). This walks every path the services, the batch reads, the webhook and the
deliverer take through the repositories, twice with other values, and fails if the same
SQL was compiled more than once.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from models import Course as CourseRow
from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.db.engines import autocommit
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.mail.deliverer import build_deliverer
from tests.conftest import World
from tests.integration.paying import LINKS, VERIFIER, pay_and_fulfil, payment_for


async def walk_every_path(uow_factory: SqlUnitOfWorkFactory, world: World, round_: int) -> None:
    email = f"walker-{round_}@example.com"
    token = await services.issue_token(uow_factory, email, scope=Scope.BUYER)
    buyer = await services.authenticate(uow_factory, token)
    assert buyer is not None
    slug = f"course-{round_}"
    for price in ("10.00", "12.50"):  # created, then updated
        await services.save_course(
            uow_factory, slug=slug, title=f"Course {round_}", price=Decimal(price), currency="EUR"
        )
    assert slug in {course.slug for course in await services.list_courses(uow_factory)}

    keyed = await services.create_purchase(
        uow_factory, buyer, course=slug, idempotency_key=f"key-{round_}", max_pending=10
    )
    again = await services.create_purchase(
        uow_factory, buyer, course=slug, idempotency_key=f"key-{round_}", max_pending=10
    )
    assert again.purchase_id == keyed.purchase_id
    other = await services.create_purchase(
        uow_factory, buyer, course=world.sql.slug, max_pending=10
    )
    for actor in (buyer, world.staff.actor):
        assert await services.get_purchase(uow_factory, actor, purchase_id=keyed.purchase_id)
        for state in (None, PurchaseState.PENDING):
            page = await services.list_purchases(uow_factory, actor, state=state, limit=1)
            await services.list_purchases(
                uow_factory, actor, state=state, limit=1, cursor=page.next_before or 10**9
            )

    batch = uow_factory.for_batch()  # a batch's reads of purchases by id, coalesced
    for owner in (buyer.user_id, None):
        found = await uow_factory.read_purchases([keyed.purchase_id, other.purchase_id], owner)
        assert len(found) == 2
    async with batch() as uow:
        assert await uow.purchases.get(keyed.purchase_id, owner_id=buyer.user_id)

    await pay_and_fulfil(uow_factory, buyer, keyed)
    await services.record_payment_event(uow_factory, VERIFIER, payment_for(other))
    await services.fulfill_purchase(  # a repeat: no change
        uow_factory,
        world.payments.actor,
        LINKS,
        purchase_id=other.purchase_id,
        purchase_state=PurchaseState.FULFILLED,
        verifier=VERIFIER,
    )
    assert await services.list_purchase_events(uow_factory, buyer, purchase_id=keyed.purchase_id)
    page = await services.list_registrations(uow_factory, buyer, limit=1)
    await services.list_registrations(uow_factory, buyer, limit=1, cursor=page.next_before)

    assert await services.revoke_token(uow_factory, token)
    await services.issue_token(uow_factory, email)
    assert await services.revoke_tokens_of(uow_factory, email) == 1


async def test_no_statement_is_compiled_twice(
    db_engine: Engine, uow_factory: SqlUnitOfWorkFactory, world: World, tmp_path: Path
) -> None:
    deliverer = build_deliverer(
        Settings(database_url="sqlite://", mail_dir=str(tmp_path / "mail")), uow_factory
    )
    for round_ in range(2):
        await walk_every_path(uow_factory, world, round_)
        assert await deliverer.deliver_all() == 2  # two receipts a round, claimed and settled

    compiled = db_engine.statements.compilations
    assert len(compiled) >= 30, sorted(compiled)  # the walk reached the repositories
    assert {sql: n for sql, n in compiled.items() if n > 1} == {}


async def test_a_statement_built_per_call_is_caught(db_engine: Engine) -> None:
    """The check above can fail: a statement built for each call shows up twice."""
    for _ in range(2):
        async with autocommit(db_engine) as connection:
            await connection.execute(select(CourseRow.id).where(CourseRow.slug == "x"))
    assert max(db_engine.statements.compilations.values()) == 2
