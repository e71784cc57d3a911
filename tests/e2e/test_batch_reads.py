"""A batch's purchase.get calls are read together, and answer exactly as one by one."""

from __future__ import annotations

from typing import Any

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import RpcCall, World


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
