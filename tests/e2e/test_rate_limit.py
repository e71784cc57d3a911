"""Per-token rate limiting, counted per call: 429 with retry_after, nothing run beyond it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.rate_limit import MemoryRateLimiter
from tests.conftest import World

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def call(method: str, id: Any, params: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


@pytest.fixture
async def limited(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> TestClient[Any, Any]:
    return await aiohttp_client(
        create_app(dataclasses.replace(settings, rate_limit=2.0, rate_burst=5))
    )


async def post(client: TestClient[Any, Any], body: Any, token: str) -> Any:
    response = await client.post("/rpc", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    return await response.json()


async def test_a_batch_is_counted_per_item(
    limited: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    batch = [
        call("purchase.create", i, {"course": "python-basics", "idempotency_key": f"k{i}"})
        for i in range(8)
    ]
    answers = {a["id"]: a for a in await post(limited, batch, world.alice.token)}
    allowed = [i for i in range(8) if "result" in answers[i]]
    limited_ids = [i for i in range(8) if "error" in answers[i]]
    assert allowed == [0, 1, 2, 3, 4]  # the burst, in order
    assert limited_ids == [5, 6, 7]
    for i in limited_ids:
        error = answers[i]["error"]
        assert error["code"] == 429 and error["message"] == "Too many requests"
        assert 0 < error["data"]["retry_after"] <= 0.5  # one call refills in 1/2 s
    async with engine.connect() as connection:
        created = (await connection.execute(text("SELECT count(*) FROM purchases"))).scalar()
    assert created == 5  # nothing beyond the limit ran


async def test_the_bucket_refills_and_is_per_token(
    limited: TestClient[Any, Any], world: World
) -> None:
    burst = [call("course.list", i) for i in range(5)]
    assert all("result" in a for a in await post(limited, burst, world.alice.token))
    over = await post(limited, call("course.list", 99), world.alice.token)
    assert over["error"]["code"] == 429
    # Bob has his own bucket.
    assert "result" in await post(limited, call("course.list", 1), world.bob.token)
    await asyncio.sleep(over["error"]["data"]["retry_after"] + 0.05)
    assert "result" in await post(limited, call("course.list", 100), world.alice.token)


async def test_limited_notifications_are_dropped_silently(
    limited: TestClient[Any, Any], world: World
) -> None:
    batch = [call("course.list", i) for i in range(5)] + [
        {"jsonrpc": "2.0", "method": "course.list"}
    ]
    answers = await post(limited, batch, world.alice.token)
    assert len(answers) == 5 and all("result" in a for a in answers)


async def test_calls_without_a_token_are_not_counted(
    limited: TestClient[Any, Any], world: World
) -> None:
    for i in range(10):
        response = await limited.post("/rpc", json=call("course.list", i))
        assert "result" in await response.json()


async def test_zero_turns_limiting_off(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, rate_limit=0, rate_burst=1))
    )
    batch = [call("course.list", i) for i in range(50)]
    assert all("result" in a for a in await post(client, batch, world.alice.token))


@pytest.mark.backends("postgresql")
async def test_the_bucket_is_shared_by_processes_on_postgresql(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    """Two apps (as two processes would be) draw from one bucket in the database."""
    tight = dataclasses.replace(settings, rate_limit=0.5, rate_burst=6)
    first = await aiohttp_client(create_app(tight))
    second = await aiohttp_client(create_app(tight))
    batch = [call("course.list", i) for i in range(4)]
    one = await post(first, batch, world.alice.token)
    two = await post(second, batch, world.alice.token)
    granted = sum("result" in a for a in one + two)
    assert granted == 6
    assert sum(a.get("error", {}).get("code") == 429 for a in one + two) == 2


async def test_memory_limiter_forgets_old_keys() -> None:
    limiter = MemoryRateLimiter(rate=1.0, burst=2, max_keys=3)
    for key in "abcd":
        assert (await limiter.take(key, 1)).granted == 1
    assert len(limiter._buckets) == 3
