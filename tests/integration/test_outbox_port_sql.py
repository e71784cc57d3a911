"""The SQL outbox repository keeps the port's contract (``tests/unit/outbox_contract.py``),
on SQLite and PostgreSQL: the same checks the in-memory fake passes. Its statements are
built once, at import: each is compiled once, however often it runs."""

from __future__ import annotations

import pytest

from rpc_server.db.connection import Engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.outbox import OutboxStatus
from tests.conftest import World
from tests.unit.fakes import FixedClock
from tests.unit.outbox_contract import CHECKS, LEASE, Check, OutboxWorld, at, queue_receipts


def outbox_world(uow_factory: SqlUnitOfWorkFactory, world: World) -> OutboxWorld:
    return OutboxWorld(
        uow_factory, alice=world.alice.actor, bob=world.bob.actor, payments=world.payments.actor
    )


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
async def test_the_sql_outbox_keeps_the_contract(
    check: Check, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    await check(outbox_world(uow_factory, world))


async def test_every_outbox_statement_is_compiled_once(
    db_engine: Engine, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    await queue_receipts(outbox_world(uow_factory, world), at(0), at(0), at(0), at(0))
    for round_ in range(2):
        now = at(10 * round_)
        clock = FixedClock(now)
        token = f"round-{round_}"
        async with uow_factory(write=True) as uow:
            dead, sent, pending = await uow.receipts.claim_due(
                now=now, lease_until=now + LEASE, token=token, limit=3
            )
            assert await uow.receipts.settle(
                dead.outbox_id, token=token, status=OutboxStatus.DEAD, now=now, error="550"
            )
            assert await uow.receipts.settle(
                sent.outbox_id, token=token, status=OutboxStatus.SENT, now=now
            )
            assert await uow.receipts.settle(
                pending.outbox_id, token=token, status=OutboxStatus.PENDING, now=now,
                next_attempt_at=now, error="busy",
            )  # fmt: skip
            await uow.receipts.release(token, now=now)
            assert await uow.receipts.status_of(sent.outbox_id) is OutboxStatus.SENT
            await uow.commit()
        assert await services.requeue_receipt(uow_factory, dead.outbox_id, clock=clock) is None
        assert await services.requeue_receipt(uow_factory, sent.outbox_id) is OutboxStatus.SENT
        with pytest.raises(NotFound):
            await services.requeue_receipt(uow_factory, 10_000)
        overview = await services.outbox_overview(uow_factory, limit=10)
        assert overview.counts[OutboxStatus.SENT] == round_ + 1

    outbox = {
        sql: n for sql, n in db_engine.statements.compilations.items() if "receipt_outbox" in sql
    }
    assert len(outbox) >= 8, sorted(outbox)  # claim (2), settle, release, requeue, status…
    assert {sql: n for sql, n in outbox.items() if n > 1} == {}
