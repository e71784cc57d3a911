"""The fake unit of work behaves like a transaction, so the service tests can trust it."""

from __future__ import annotations

import pytest

from rpc_server.domain.states import PurchaseState
from tests.unit.conftest import FakeWorld
from tests.unit.fakes import FixedClock, ReadOnlyUnitOfWork


async def test_changes_without_commit_are_discarded(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert await uow.purchases.get("abc", owner_id=None) is not None
    assert fake.uow.purchases == []
    assert fake.uow.commits == 0
    assert fake.uow.rollbacks == 1


async def test_changes_are_discarded_when_the_block_raises(
    fake: FakeWorld, clock: FixedClock
) -> None:
    with pytest.raises(RuntimeError):
        async with fake.uow(write=True) as uow:
            await uow.courses.save(slug="rust", title="Rust", price=fake.python.price, currency="X")
            raise RuntimeError
    assert "rust" not in fake.uow.committed.courses


async def test_commit_publishes_and_later_changes_are_discarded(
    fake: FakeWorld, clock: FixedClock
) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert purchase is not None
        await uow.commit()
        changed = await uow.purchases.transition(
            purchase.pk,
            sources=frozenset({PurchaseState.PENDING}),
            target=PurchaseState.CANCELED,
            error_msg=None,
            now=clock(),
        )
        assert changed
    assert fake.uow.purchase("abc").state is PurchaseState.PENDING
    assert fake.uow.commits == 1


async def test_transition_is_conditional(fake: FakeWorld, clock: FixedClock) -> None:
    async with fake.uow(write=True) as uow:
        purchase = await uow.purchases.add(
            purchase_id="abc", owner_id=fake.alice.user_id, course=fake.python,
            idempotency_key=None, now=clock(),
        )  # fmt: skip
        assert purchase is not None
        refused = await uow.purchases.transition(
            purchase.pk,
            sources=frozenset({PurchaseState.FAILED}),
            target=PurchaseState.FULFILLED,
            error_msg=None,
            now=clock(),
        )
        stored = await uow.purchases.get("abc", owner_id=None)
    assert refused is False
    assert stored == purchase


async def test_read_only_units_refuse_writes(fake: FakeWorld) -> None:
    async with fake.uow() as uow:
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.commit()
        with pytest.raises(ReadOnlyUnitOfWork):
            await uow.courses.save(slug="x", title="x", price=fake.python.price, currency="USD")
