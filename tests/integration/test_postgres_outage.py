"""PostgreSQL outages: calls fail cleanly with -32000 and recover without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.jsonrpc.errors import SERVICE_UNAVAILABLE
from tests.conftest import World
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.backends("postgresql")

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def proxied_client(
    aiohttp_client: AiohttpClient, settings: Settings, database_proxy: TcpProxy, world: World
) -> TestClient[Any, Any]:
    url = make_url(settings.database_url).set(port=database_proxy.port)
    proxied = dataclasses.replace(
        settings,
        database_url=url.render_as_string(hide_password=False),
        db_connect_timeout=1.0,
        db_pool_timeout=2.0,
        mail_in_serve=False,
        # The load below opens purchases without end; the pending cap is not what it tests.
        max_pending_purchases=1_000_000,
    )
    return await aiohttp_client(create_app(proxied))


async def call(client: TestClient[Any, Any], token: str, method: str, params: Any) -> Any:
    response = await client.post(
        "/rpc",
        json={"jsonrpc": "2.0", "method": method, "params": params, "id": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 200
    return await response.json()


async def test_outage_answers_service_unavailable_then_recovers(
    proxied_client: TestClient[Any, Any], database_proxy: TcpProxy, world: World
) -> None:
    token = world.alice.token
    created = await call(proxied_client, token, "purchase.create", {"course": "python-basics"})
    purchase_id = created["result"]["purchase_id"]
    assert (await proxied_client.get("/readyz")).status == 200

    await database_proxy.stop()
    during = await call(proxied_client, token, "purchase.get", [purchase_id])
    assert during["error"] == {"code": SERVICE_UNAVAILABLE, "message": during["error"]["message"]}
    assert "unavailable" in during["error"]["message"].lower()
    ready = await proxied_client.get("/readyz")
    assert ready.status == 503
    assert await ready.json() == {"status": "unavailable"}

    await database_proxy.start()
    after = await call(proxied_client, token, "purchase.get", [purchase_id])
    assert after["result"]["purchase_id"] == purchase_id
    assert (await proxied_client.get("/readyz")).status == 200


async def test_outage_under_load_never_answers_internal_errors(
    proxied_client: TestClient[Any, Any], database_proxy: TcpProxy, world: World
) -> None:
    """Calls in flight when the connection is cut fail as -32000, never -32603 or 500."""
    token = world.alice.token
    answers: list[Any] = []
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            params = {"course": "python-basics", "idempotency_key": f"w{worker}-{i}"}
            answers.append(await call(proxied_client, token, "purchase.create", params))
            i += 1

    workers = [asyncio.create_task(load(n)) for n in range(4)]
    await asyncio.sleep(0.3)
    await database_proxy.stop()
    await asyncio.sleep(0.5)
    await database_proxy.start()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)

    codes = {body["error"]["code"] for body in answers if "error" in body}
    assert codes == {SERVICE_UNAVAILABLE}  # the outage was seen, and only as -32000
    assert any("result" in body for body in answers[-4:])  # recovered by the end


async def test_killed_connections_are_replaced_without_failing_calls(
    client: TestClient[Any, Any], database_url: str, world: World
) -> None:
    """pg_terminate_backend on every pooled connection: pre-ping replaces them."""
    token = world.alice.token
    created = await call(client, token, "purchase.create", {"course": "python-basics"})
    purchase_id = created["result"]["purchase_id"]
    # Fill the pool with several idle connections.
    await asyncio.gather(*(call(client, token, "purchase.get", [purchase_id]) for _ in range(5)))

    url = make_url(database_url)
    admin = await asyncpg.connect(
        url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    )
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            url.database,
        )
    finally:
        await admin.close()
    assert killed >= 1

    after = [await call(client, token, "purchase.get", [purchase_id]) for _ in range(5)]
    assert all(body.get("result", {}).get("purchase_id") == purchase_id for body in after), after
