"""The token cache: a revoked buyer token stops working within RPC_SERVER_TOKEN_CACHE_SECONDS,
a staff or payments token at once, any token at its expiry; unknown tokens are looked up
once while remembered, and their failures logged once per client."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from rpc_server.app import ACTORS, create_app
from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
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
    uow_factory: SqlUnitOfWorkFactory,
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
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, token_cache_seconds=0)))
    token = await services.issue_token(uow_factory, "erin@example.com")
    assert await code_of(client, token) is None
    assert await services.revoke_token(uow_factory, token)
    assert await code_of(client, token) == 401


@pytest.mark.parametrize("who", ["staff", "payments"])
async def test_revoking_a_staff_or_payments_token_takes_effect_at_once(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    who: str,
) -> None:
    # However long buyers' tokens are trusted from memory, these never are.
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, token_cache_seconds=300))
    )
    token = getattr(world, who).token
    assert await code_of(client, token) is None
    assert await code_of(client, token) is None
    assert await services.revoke_token(uow_factory, token)
    assert await code_of(client, token) == 401


async def test_an_expiring_buyer_token_is_not_trusted_past_its_expiry(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, token_cache_seconds=300))
    )
    token = await services.issue_token(
        uow_factory, "brief@example.com", expires_in=timedelta(seconds=1)
    )
    assert await code_of(client, token) is None  # looked up, then cached: at most 1 s
    await asyncio.sleep(1.1)  # the token's own lifetime passing, not a synchronisation
    assert await code_of(client, token) == 401


async def test_an_unknown_token_is_looked_up_once_while_remembered(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO, logger="rpc_server.auth"):
        for _ in range(20):
            assert await code_of(client, "rpcs_not-a-token-anyone-holds") == 401
    actors = app[ACTORS]
    assert (actors.lookups, actors.unknown_hits) == (1, 19)
    # One INFO line for the client, not twenty WARNINGs.
    lines = [r for r in caplog.records if r.name == "rpc_server.auth"]
    assert [r.levelname for r in lines] == ["INFO"]
    assert lines[0].getMessage().startswith("authentication failed from 127.0.0.1: ")
    assert "rpcs_not-a-token" not in lines[0].getMessage()  # never the token itself
