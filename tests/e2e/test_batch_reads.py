"""A batch's purchase.get calls are read together, and answer exactly as one by one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.records import Purchase
from rpc_server.domain.states import PurchaseState
from tests.conftest import RpcCall, World
from tests.integration.paying import pay_and_fulfil


async def post(client: Any, body: Any, token: str) -> Any:
    response = await client.post("/rpc", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    return await response.json()


async def test_a_batch_of_gets_answers_each_item_as_the_same_call_alone(
    client: Any, rpc: RpcCall, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    alices = [
        await services.create_purchase(uow_factory, world.alice.actor, course=course)
        for course in ("python-basics", "sql-fundamentals", "python-basics")
    ]
    bobs = await services.create_purchase(uow_factory, world.bob.actor, course="sql-fundamentals")
    params: list[Any] = [
        {"purchase_id": alices[0].purchase_id},
        [alices[1].purchase_id],  # by position
        {"purchase_id": bobs.purchase_id},  # someone else's: not found, as alone
        {"purchase_id": "0" * 32},  # nobody's
        {"purchase_id": alices[0].purchase_id},  # the same one again
        {"purchase_id": 42},  # invalid params
        {"purchase_id": alices[2].purchase_id},
    ]
    kinds = {
        world.alice.token: [
            (True, None), (True, None), (False, 404), (False, 404),
            (True, None), (False, -32602), (True, None),
        ],
        world.staff.token: [  # staff see every purchase
            (True, None), (True, None), (True, None), (False, 404),
            (True, None), (False, -32602), (True, None),
        ],
    }  # fmt: skip
    for token, expected in kinds.items():
        alone = [
            (await rpc("purchase.get", p, token=token)) | {"id": n} for n, p in enumerate(params)
        ]
        assert [("result" in a, a.get("error", {}).get("code")) for a in alone] == expected
        batch = [
            {"jsonrpc": "2.0", "method": "purchase.get", "params": p, "id": n}
            for n, p in enumerate(params)
        ]
        assert await post(client, batch, token) == alone


async def test_a_batch_mixing_reads_and_writes_answers_every_item(
    client: Any, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    made = await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
    batch = [
        {"jsonrpc": "2.0", "method": "purchase.get", "params": [made.purchase_id], "id": 1},
        {"jsonrpc": "2.0", "method": "purchase.create", "params": ["sql-fundamentals"], "id": 2},
        {"jsonrpc": "2.0", "method": "purchase.list", "id": 3},
        {"jsonrpc": "2.0", "method": "purchase.get", "params": [made.purchase_id], "id": 4},
    ]
    answers = {a["id"]: a for a in await post(client, batch, world.alice.token)}
    assert answers[1]["result"] == answers[4]["result"]
    assert answers[1]["result"]["purchase_id"] == made.purchase_id
    created = answers[2]["result"]
    assert (created["course"], created["state"]) == ("sql-fundamentals", "pending")
    assert answers[3]["result"]["items"]  # alice's purchases, one or two of them
    # The purchase created in the batch is there to read afterwards, by itself.
    again = await post(
        client,
        [{"jsonrpc": "2.0", "method": "purchase.get", "params": [created["purchase_id"]], "id": 5}],
        world.alice.token,
    )
    assert again[0]["result"]["purchase_id"] == created["purchase_id"]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], int | None]]:
    """Each read of purchases by id a batch makes: (the ids, the owner scope)."""
    made: list[tuple[list[str], int | None]] = []
    original = SqlUnitOfWorkFactory.read_purchases

    async def recorded(
        self: SqlUnitOfWorkFactory, purchase_ids: Sequence[str], owner_id: int | None
    ) -> dict[str, Purchase]:
        made.append((list(purchase_ids), owner_id))
        return await original(self, purchase_ids, owner_id)

    monkeypatch.setattr(SqlUnitOfWorkFactory, "read_purchases", recorded)
    return made


async def test_a_batch_of_gets_is_read_with_one_statement(
    client: Any,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    reads: list[tuple[list[str], int | None]],
) -> None:
    """More gets than the batch runs at once (the pool's 10): still one read, of every
    id asked with valid params, in the caller's scope."""
    made = [
        await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
        for _ in range(25)
    ]
    ids = [p.purchase_id for p in made]
    bobs = await services.create_purchase(uow_factory, world.bob.actor, course="python-basics")
    params: list[Any] = [{"purchase_id": i} for i in ids[:12]]
    params += [[bobs.purchase_id], {"purchase_id": "X" * 65}, {"purchase_id": ids[0]}]
    params += [[i] for i in ids[12:]]
    batch = [
        {"jsonrpc": "2.0", "method": "purchase.get", "params": p, "id": n}
        for n, p in enumerate(params)
    ]
    answers = await post(client, batch, world.alice.token)
    got = {a["id"]: a.get("result", {}).get("purchase_id") or a["error"]["code"] for a in answers}
    assert got == {
        **{n: ids[n] for n in range(12)},
        12: 404,  # bob's
        13: -32602,  # invalid params: not read ahead
        14: ids[0],  # asked twice
        **{15 + n: ids[12 + n] for n in range(13)},
    }
    assert reads == [([*ids[:12], bobs.purchase_id, *ids[12:]], world.alice.actor.user_id)]


async def test_a_get_after_a_write_of_the_batch_reads_afresh(
    uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    """The first write unit of work of a batch ends its reading ahead: a get that starts
    after the write sees it, not what was read ahead before."""
    made = await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
    batch = uow_factory.for_batch()
    batch.expect_purchase(made.purchase_id)
    before = await services.get_purchase(batch, world.alice.actor, purchase_id=made.purchase_id)
    assert before.state is PurchaseState.PENDING
    await pay_and_fulfil(batch, world.alice.actor, made)  # a call of the batch writes
    after = await services.get_purchase(batch, world.alice.actor, purchase_id=made.purchase_id)
    assert after.state is PurchaseState.FULFILLED
