"""Who may call what: bearer tokens, other users' purchases, the staff desk, batches."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from models import ApiToken, ReceiptOutbox
from rpc_server.domain.tokens import hash_token
from tests.conftest import RpcCall, World
from tests.e2e.conftest import Counts, CreatePurchase, PostRaw, request_object

UNAUTHENTICATED = 401

# Every method that needs a token, with params that would succeed with one.
AUTHENTICATED_CALLS: list[tuple[str, Any]] = [
    ("purchase.create", {"course": "python-basics"}),
    ("purchase.create", {"course": "python-basics", "idempotency_key": "k"}),
    ("purchase.get", {"purchase_id": "<purchase_id>"}),
    ("purchase.list", None),
    ("purchase.list", {"limit": 1}),
    ("purchase.fulfill", {"purchase_id": "<purchase_id>", "purchase_state": "fulfilled"}),
    ("purchase.fulfill", ["<purchase_id>", "canceled"]),
    ("registration.list", None),
]

BAD_AUTHORIZATION = {
    "none": None,
    "empty": "",
    "scheme-only": "Bearer",
    "scheme-and-space": "Bearer ",
    "basic": "Basic YWxpY2U6c2VjcmV0",
    "unknown-token": "Bearer rpcs_not-a-token-anyone-holds",
    "token-without-scheme": "<token>",
    "other-scheme": "Token <token>",
    "token-plus-suffix": "Bearer <token>x",
    "token-prefix": "Bearer <token-prefix>",
    "two-tokens": "Bearer <token> <token>",
}


def _fill(params: Any, purchase_id: str) -> Any:
    if isinstance(params, dict):
        return {k: purchase_id if v == "<purchase_id>" else v for k, v in params.items()}
    if isinstance(params, list):
        return [purchase_id if v == "<purchase_id>" else v for v in params]
    return params


def _authorization(template: str | None, token: str) -> dict[str, str]:
    if template is None:
        return {}
    value = (
        template.replace("<token-prefix>", token[:-1]).replace("<token>", token)
    )  # fmt: skip
    return {"Authorization": value}


@pytest.mark.parametrize(("method", "params"), AUTHENTICATED_CALLS)
@pytest.mark.parametrize("authorization", list(BAD_AUTHORIZATION), ids=list(BAD_AUTHORIZATION))
async def test_methods_need_a_valid_bearer_token(
    post: PostRaw,
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    method: str,
    params: Any,
    authorization: str,
) -> None:
    purchase = await create_purchase()
    counts = await row_counts()
    headers = _authorization(BAD_AUTHORIZATION[authorization], world.alice.token)

    reply = await post(
        request_object(method, _fill(params, purchase["purchase_id"])), headers=headers
    )
    assert reply.status == 200
    body = reply.json
    assert "result" not in body
    assert body["error"]["code"] == UNAUTHENTICATED
    assert body["id"] == 1
    assert await row_counts() == counts


@pytest.mark.parametrize("authorization", list(BAD_AUTHORIZATION), ids=list(BAD_AUTHORIZATION))
async def test_course_list_needs_no_token(post: PostRaw, world: World, authorization: str) -> None:
    headers = _authorization(BAD_AUTHORIZATION[authorization], world.alice.token)
    body = (await post(request_object("course.list"), headers=headers)).json
    assert [c["slug"] for c in body["result"]] == ["python-basics", "sql-fundamentals"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_bearer_scheme_is_case_insensitive(post: PostRaw, world: World, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {world.alice.token}"}
    body = (await post(request_object("purchase.list"), headers=headers)).json
    assert body["result"] == {"items": [], "next_cursor": None}


async def test_revoked_and_expired_tokens_are_refused(
    rpc: RpcCall, world: World, engine: AsyncEngine
) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(world.alice.token))
            .values(revoked_at=now)
        )
        await connection.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(world.bob.token))
            .values(expires_at=now - timedelta(seconds=1))
        )
    for token in (world.alice.token, world.bob.token):
        body = await rpc("purchase.list", token=token)
        assert body["error"]["code"] == UNAUTHENTICATED
    assert "result" in await rpc("purchase.list", token=world.staff.token)


async def test_token_that_is_not_utf8_is_refused_not_an_internal_error(
    client: TestClient[Any, Any], world: World
) -> None:
    # Header bytes that are not UTF-8 reach the app as surrogate escapes; a token like
    # that is simply one nobody holds.
    body = json.dumps(request_object("purchase.list")).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /rpc HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Authorization: Bearer \xff\xfe-token\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert json.loads(payload)["error"]["code"] == UNAUTHENTICATED, payload


# --- other users' purchases -------------------------------------------------------------


async def test_other_users_purchase_is_not_found_and_stays_unchanged(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, row_counts: Counts
) -> None:
    alices = await create_purchase()
    purchase_id = alices["purchase_id"]
    counts = await row_counts()
    bob = world.bob.token

    error = (await rpc("purchase.get", [purchase_id], token=bob))["error"]
    assert error["code"] == 404
    assert (await rpc("purchase.list", token=bob))["result"] == {"items": [], "next_cursor": None}
    for state in ("fulfilled", "failed", "canceled"):
        body = await rpc("purchase.fulfill", [purchase_id, state, "bob was here"], token=bob)
        assert body["error"]["code"] == 404, state
        # The same answer as for a purchase that does not exist: ids cannot be probed.
        missing = await rpc("purchase.fulfill", ["f" * 32, state], token=bob)
        assert missing["error"]["message"] == body["error"]["message"]

    assert (await rpc("purchase.get", [purchase_id], token=world.alice.token))["result"] == alices
    assert await row_counts() == counts
    assert (await rpc("registration.list", token=bob))["result"] == []


async def test_each_user_lists_only_their_own(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    alices = {(await create_purchase())["purchase_id"] for _ in range(2)}
    bobs = {(await create_purchase(token=world.bob.token))["purchase_id"] for _ in range(3)}
    for token, own in ((world.alice.token, alices), (world.bob.token, bobs)):
        items = (await rpc("purchase.list", token=token))["result"]["items"]
        assert {p["purchase_id"] for p in items} == own
    staff_items = (await rpc("purchase.list", token=world.staff.token))["result"]["items"]
    assert {p["purchase_id"] for p in staff_items} == alices | bobs


# --- staff ------------------------------------------------------------------------------


async def test_staff_sees_every_purchase_in_list_and_get(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    alices = await create_purchase()
    bobs = await create_purchase("sql-fundamentals", token=world.bob.token)
    staff = world.staff.token

    items = (await rpc("purchase.list", token=staff))["result"]["items"]
    assert items == [bobs, alices]
    filtered = (await rpc("purchase.list", {"state": "pending", "limit": 1}, token=staff))["result"]
    assert filtered["items"] == [bobs]
    for purchase in (alices, bobs):
        assert (await rpc("purchase.get", [purchase["purchase_id"]], token=staff))["result"] == (
            purchase
        )


async def test_staff_fulfills_for_the_owner(
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    engine: AsyncEngine,
) -> None:
    purchase_id = (await create_purchase())["purchase_id"]
    fulfilled = (
        await rpc("purchase.fulfill", [purchase_id, "fulfilled"], token=world.staff.token)
    )["result"]
    assert fulfilled["purchase"]["state"] == "fulfilled"

    # The registration is alice's, not the staff member's who asked for it.
    alices = (await rpc("registration.list", token=world.alice.token))["result"]
    assert [r["purchase_id"] for r in alices] == [purchase_id]
    assert (await rpc("registration.list", token=world.staff.token))["result"] == []
    assert (await rpc("registration.list", token=world.bob.token))["result"] == []
    # And the receipt goes to alice.
    async with engine.connect() as connection:
        recipients = (await connection.execute(select(ReceiptOutbox.recipient))).scalars().all()
    assert recipients == [world.alice.email]

    # Alice sees the same purchase, and repeating as alice answers the same.
    again = (await rpc("purchase.fulfill", [purchase_id, "fulfilled"], token=world.alice.token))[
        "result"
    ]
    assert again == fulfilled


# --- batches ----------------------------------------------------------------------------


async def test_batch_with_a_token_authenticates_every_item(
    post: PostRaw, create_purchase: CreatePurchase, world: World
) -> None:
    purchase_id = (await create_purchase())["purchase_id"]
    batch = [
        request_object("purchase.create", {"course": "sql-fundamentals"}, id=1),
        request_object("purchase.get", [purchase_id], id=2),
        request_object("purchase.list", {"limit": 5}, id=3),
        request_object("purchase.fulfill", [purchase_id, "fulfilled"], id=4),
        request_object("registration.list", id=5),
        request_object("course.list", id=6),
        *[request_object("purchase.list", id=i) for i in range(7, 20)],
    ]
    answers = (await post(batch, token=world.alice.token)).json
    assert sorted(a["id"] for a in answers) == list(range(1, 20))
    failures = [a for a in answers if "result" not in a]
    assert failures == []


async def test_batch_without_a_token_refuses_every_item_but_course_list(
    post: PostRaw, world: World
) -> None:
    batch = [
        request_object("purchase.list", id=1),
        request_object("registration.list", id=2),
        request_object("course.list", id=3),
    ]
    answers = {a["id"]: a for a in (await post(batch, token="rpcs_unknown")).json}
    assert answers[1]["error"]["code"] == UNAUTHENTICATED
    assert answers[2]["error"]["code"] == UNAUTHENTICATED
    assert len(answers[3]["result"]) == 2
