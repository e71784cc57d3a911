"""The cap on open (pending) purchases per user, over HTTP on both engines.

``RPC_SERVER_MAX_PENDING_PURCHASES`` (default 50): past it ``purchase.create`` answers
409 with ``{"pending": n, "limit": cap}`` and creates nothing; an idempotent replay still
answers. The 100 creates of one batch run concurrently: the cap holds all the same
(the user's row is held while counting on PostgreSQL; SQLite's writers are serialized).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from tests.conftest import RpcCall, World

CONFLICT = 409
CAP = 3


async def purchases_of(engine: AsyncEngine, email: str) -> dict[str, int]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT p.state, count(*) FROM purchases p JOIN users u ON u.id = p.owner_id "
                "WHERE u.email = :email GROUP BY p.state"
            ),
            {"email": email},
        )
        return {state: count for state, count in rows}


async def create(rpc: RpcCall, token: str, **params: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await rpc(
        "purchase.create", {"course": "python-basics", **params}, token=token
    )
    return answer


class TestWithASmallCap:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return replace(settings, max_pending_purchases=CAP)

    async def test_past_the_cap_409_with_the_numbers_and_nothing_created(
        self, rpc: RpcCall, world: World, engine: AsyncEngine
    ) -> None:
        for _ in range(CAP):
            assert "result" in await create(rpc, world.alice.token)

        answer = await create(rpc, world.alice.token)

        assert answer["error"]["code"] == CONFLICT
        assert answer["error"]["data"] == {"pending": CAP, "limit": CAP}
        assert f"{CAP} open purchases" in answer["error"]["message"]
        assert await purchases_of(engine, "alice@example.com") == {"pending": CAP}
        # Another buyer is not affected.
        assert "result" in await create(rpc, world.bob.token)

    async def test_an_idempotent_replay_still_answers_at_the_cap(
        self, rpc: RpcCall, world: World
    ) -> None:
        first = await create(rpc, world.alice.token, idempotency_key="order-1")
        for _ in range(CAP - 1):
            await create(rpc, world.alice.token)
        assert await create(rpc, world.alice.token, idempotency_key="order-1") == {
            **first,
            "id": first["id"] + CAP,
        }
        assert (await create(rpc, world.alice.token, idempotency_key="order-2"))["error"][
            "code"
        ] == CONFLICT

    async def test_canceling_one_makes_room(self, rpc: RpcCall, world: World) -> None:
        ids = [(await create(rpc, world.alice.token))["result"]["purchase_id"] for _ in range(CAP)]
        assert "error" in await create(rpc, world.alice.token)
        canceled = await rpc(
            "purchase.fulfill",
            {"purchase_id": ids[0], "purchase_state": "canceled"},
            token=world.alice.token,
        )
        assert canceled["result"]["purchase"]["state"] == "canceled"
        assert "result" in await create(rpc, world.alice.token)


async def test_a_batch_of_100_creates_stops_at_the_default_cap_of_50(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine, settings: Settings
) -> None:
    """The issue's batch: 100 creates at once, run concurrently (as many at a time as
    the pool has connections). Exactly 50 are created; the other 50 answer 409."""
    assert settings.max_pending_purchases == 50
    batch = [
        {"jsonrpc": "2.0", "method": "purchase.create", "params": {"course": "python-basics"},
         "id": n}
        for n in range(100)
    ]  # fmt: skip
    response = await client.post(
        "/rpc", json=batch, headers={"Authorization": f"Bearer {world.alice.token}"}
    )
    answers = await response.json()

    created = [a for a in answers if "result" in a]
    refused = [a for a in answers if "error" in a]
    assert (len(created), len(refused)) == (50, 50)
    assert {a["error"]["code"] for a in refused} == {CONFLICT}
    assert {a["error"]["data"]["limit"] for a in refused} == {50}
    assert {a["error"]["data"]["pending"] for a in refused} == {50}
    assert await purchases_of(engine, "alice@example.com") == {"pending": 50}
