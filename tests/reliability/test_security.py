"""Security: object-level authorization for every method and every kind of token, tokens
stored only as hashes, and logs that never hold a secret."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.tokens import hash_token
from rpc_server.methods import REGISTRY
from tests.conftest import World
from tests.processes import RPC_SERVER

PURCHASE_METHODS = ("purchase.get", "purchase.fulfill", "purchase.events")


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RPC_SERVER, *args],
        env={**os.environ, "RPC_SERVER_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def post(client: TestClient[Any, Any], token: str | None, method: str, params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    response = await client.post("/rpc", json=body, headers=headers)
    assert response.status == 200
    return await response.json()


def params_for(method: str, purchase_id: str) -> dict[str, Any]:
    return {
        "course.list": {},
        "rpc.discover": {},
        "purchase.create": {"course": "python-basics", "idempotency_key": "probe"},
        "purchase.get": {"purchase_id": purchase_id},
        "purchase.list": {"limit": 100},
        "purchase.fulfill": {"purchase_id": purchase_id, "purchase_state": "canceled"},
        "purchase.events": {"purchase_id": purchase_id},
        "registration.list": {},
        "rpc.authenticate": {"token": "rpcs_" + "x" * 43},
        "purchase.subscribe": {"purchase_id": purchase_id, "since": 0},
        "purchase.unsubscribe": {"subscription": "0" * 32},
    }[method]


@pytest.fixture
async def dead_tokens(
    database_url: str, uow_factory: SqlUnitOfWorkFactory, world: World
) -> dict[str, str]:
    """Tokens that must no longer work: expired, revoked one by one, revoked per user."""
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    expired = await services.issue_token(
        uow_factory, "bob@example.com", expires_in=timedelta(days=1), clock=lambda: long_ago
    )
    revoked = await services.issue_token(uow_factory, "bob@example.com")
    carol = await services.issue_token(uow_factory, "carol@example.com")
    one = await asyncio.to_thread(cli, database_url, "revoke-token", revoked)
    assert one.returncode == 0, one.stderr
    again = await asyncio.to_thread(cli, database_url, "revoke-token", revoked)
    assert again.returncode == 1 and "no such live token" in again.stderr
    everyone = await asyncio.to_thread(
        cli, database_url, "revoke-token", "--user", "carol@example.com"
    )
    assert everyone.returncode == 0 and "1 token(s)" in everyone.stdout
    return {"expired": expired, "revoked": revoked, "revoked-user": carol,
            "unknown": "rpcs_" + "x" * 43, "malformed": "not a token"}  # fmt: skip


async def test_object_level_authorization_for_every_method(
    client: TestClient[Any, Any],
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    dead_tokens: dict[str, str],
) -> None:
    alices = await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
    bobs = await services.create_purchase(uow_factory, world.bob.actor, course="sql-fundamentals")
    probes = 0

    async def snapshot() -> list[Any]:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT purchase_id, state FROM purchases ORDER BY id")
            )
            return [tuple(row) for row in rows]

    before = await snapshot()
    # Without a valid token, every method that needs one answers 401 and changes nothing.
    for label, token in [("none", None), *dead_tokens.items()]:
        for name, method in REGISTRY.methods.items():
            answer = await post(client, token, name, params_for(name, alices.purchase_id))
            probes += 1
            if method.transport == "websocket":
                # Over HTTP whatever the token (tests/e2e/test_websocket.py probes them
                # on a socket: another's purchase is 404 there too).
                assert answer.get("error", {}).get("code") == -32601, (label, name, answer)
            elif method.auth:
                assert answer.get("error", {}).get("code") == 401, (label, name, answer)
            else:
                assert "result" in answer, (label, name, answer)
    assert await snapshot() == before

    # Bob probing Alice's purchase gets 404, exactly like a purchase that does not exist.
    for name in PURCHASE_METHODS:
        theirs = await post(client, world.bob.token, name, params_for(name, alices.purchase_id))
        nobody = await post(client, world.bob.token, name, params_for(name, "0" * 32))
        probes += 2
        assert theirs["error"]["code"] == nobody["error"]["code"] == 404
        assert theirs["error"]["message"] == nobody["error"]["message"]
    listed = await post(client, world.bob.token, "purchase.list", {"limit": 100})
    assert [p["purchase_id"] for p in listed["result"]["items"]] == [bobs.purchase_id]
    assert await snapshot() == before

    # A buyer cannot fulfil even their own purchase on their word: 402, nothing changes.
    request = {"purchase_id": bobs.purchase_id, "purchase_state": "fulfilled"}
    unpaid = await post(client, world.bob.token, "purchase.fulfill", request)
    probes += 1
    assert unpaid["error"]["code"] == 402, unpaid
    assert unpaid["error"]["data"] == {"reason": "missing"}
    assert await snapshot() == before

    # Staff and the payment backend see and act on everyone's purchases.
    for token in (world.staff.token, world.payments.token):
        seen = await post(client, token, "purchase.list", {"limit": 100})
        assert {p["purchase_id"] for p in seen["result"]["items"]} == {
            alices.purchase_id, bobs.purchase_id
        }  # fmt: skip
    request = {"purchase_id": alices.purchase_id, "purchase_state": "fulfilled"}
    fulfilled = await post(client, world.staff.token, "purchase.fulfill", request)  # a comp
    assert fulfilled["result"]["purchase"]["state"] == "fulfilled"
    request = {"purchase_id": bobs.purchase_id, "purchase_state": "fulfilled"}
    fulfilled = await post(client, world.payments.token, "purchase.fulfill", request)
    assert fulfilled["result"]["purchase"]["state"] == "fulfilled"
    mine = await post(client, world.alice.token, "registration.list", {})
    staffs = await post(client, world.staff.token, "registration.list", {})
    assert [r["purchase_id"] for r in mine["result"]] == [alices.purchase_id]
    assert staffs["result"] == []
    # Alice sees that the support desk made the change, not who at the desk.
    events = await post(client, world.alice.token, "purchase.events", [alices.purchase_id])
    [_, comp] = events["result"]
    assert (comp["actor_scope"], comp["evidence"], comp["actor_email"]) == (
        "staff", "staff_comp", None
    )  # fmt: skip
    print(f"security probes: {probes} calls, {len(dead_tokens) + 1} kinds of bad token")


async def test_tokens_are_stored_only_as_hashes(
    engine: AsyncEngine, world: World, dead_tokens: dict[str, str]
) -> None:
    issued = [world.alice.token, world.bob.token, world.staff.token, world.payments.token,
              dead_tokens["expired"]]  # fmt: skip
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT * FROM api_tokens"))).all()
    stored = " ".join(str(value) for row in rows for value in row)
    for token in issued:
        assert token not in stored
        assert hash_token(token) in stored


async def test_auth_failures_and_internal_errors_log_no_secrets(
    client: TestClient[Any, Any],
    world: World,
    dead_tokens: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = dead_tokens["revoked"]
    answer = await post(client, secret, "purchase.list", {})
    assert answer["error"]["code"] == 401
    # A valid token on a call whose params break nothing still never appears in logs.
    await post(client, world.alice.token, "purchase.get", {"purchase_id": "0" * 32})
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "authentication failed" in logged
    assert secret not in logged and world.alice.token not in logged
    assert hash_token(secret)[:12] in logged  # enough to correlate, useless to an attacker
