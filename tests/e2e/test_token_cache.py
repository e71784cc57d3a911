"""The token cache: a revoked token stops working within RPC_SERVER_TOKEN_CACHE_SECONDS."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.domain import services
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from tests.conftest import World

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def code_of(client: TestClient[Any, Any], token: str) -> int | None:
    body = {"jsonrpc": "2.0", "method": "registration.list", "id": 1}
    response = await client.post("/rpc", json=body, headers={"Authorization": f"Bearer {token}"})
    answer = await response.json()
    return answer.get("error", {}).get("code")


async def test_revocation_takes_effect_within_the_cache_time(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    uow_factory: SqlAlchemyUnitOfWorkFactory,
    world: World,
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, token_cache_seconds=0.3))
    )
    token = await services.issue_token(uow_factory, "dana@example.com")
    assert await code_of(client, token) is None  # looked up, then cached
    assert await services.revoke_token(uow_factory, token)
    assert await code_of(client, token) is None  # still cached: at most 0.3 s more
    await asyncio.sleep(0.35)
    assert await code_of(client, token) == 401


async def test_without_a_cache_revocation_is_immediate(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    uow_factory: SqlAlchemyUnitOfWorkFactory,
    world: World,
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, token_cache_seconds=0)))
    token = await services.issue_token(uow_factory, "erin@example.com")
    assert await code_of(client, token) is None
    assert await services.revoke_token(uow_factory, token)
    assert await code_of(client, token) == 401
