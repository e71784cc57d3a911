"""Who may call what: bearer tokens, other users' purchases, the staff desk and the payment
backend, batches."""

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
from tests.e2e.conftest import (
    PAYMENT_NOT_VERIFIED,
    Counts,
    CreatePurchase,
    Events,
    PostRaw,
    request_object,
)
from tests.payments import proof_for

UNAUTHENTICATED = 401

# Every method that needs a token, with params that would succeed with one
# ("<proof>": a valid payment_proof for the purchase).
AUTHENTICATED_CALLS: list[tuple[str, Any]] = [
    ("purchase.create", {"course": "python-basics"}),
    ("purchase.create", {"course": "python-basics", "idempotency_key": "k"}),
    ("purchase.get", {"purchase_id": "<purchase_id>"}),
    ("purchase.list", None),
    ("purchase.list", {"limit": 1}),
    (
        "purchase.fulfill",
        {"purchase_id": "<purchase_id>", "purchase_state": "fulfilled", "payment_proof": "<proof>"},
    ),
    ("purchase.fulfill", ["<purchase_id>", "fulfilled", "", "<proof>"]),
    ("purchase.fulfill", ["<purchase_id>", "canceled"]),
    ("purchase.events", {"purchase_id": "<purchase_id>"}),
    ("purchase.events", ["<purchase_id>"]),
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


def _fill(params: Any, purchase: dict[str, Any]) -> Any:
    def fill(value: Any) -> Any:
        if value == "<purchase_id>":
            return purchase["purchase_id"]
        return proof_for(purchase) if value == "<proof>" else value

    if isinstance(params, dict):
        return {k: fill(v) for k, v in params.items()}
    if isinstance(params, list):
        return [fill(v) for v in params]
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

    reply = await post(request_object(method, _fill(params, purchase)), headers=headers)
    assert reply.status == 200
    body = reply.json
    assert "result" not in body
    assert body["error"]["code"] == UNAUTHENTICATED
    assert body["id"] == 1
    assert await row_counts() == counts


@pytest.mark.parametrize(("method", "params"), AUTHENTICATED_CALLS)
async def test_the_same_calls_succeed_with_the_owners_token(
    post: PostRaw, create_purchase: CreatePurchase, world: World, method: str, params: Any
) -> None:
    purchase = await create_purchase()
    reply = await post(request_object(method, _fill(params, purchase)), token=world.alice.token)
    assert reply.status == 200
    assert "result" in reply.json, reply.json


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
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    purchase_events: Events,
) -> None:
    alices = await create_purchase()
    purchase_id = alices["purchase_id"]
    history = await purchase_events(purchase_id)
    counts = await row_counts()
    bob = world.bob.token

    error = (await rpc("purchase.get", [purchase_id], token=bob))["error"]
    assert error["code"] == 404
    assert (await rpc("purchase.list", token=bob))["result"] == {"items": [], "next_cursor": None}
    for method, params in (("purchase.get", [purchase_id]), ("purchase.events", [purchase_id])):
        body = await rpc(method, params, token=bob)
        assert body["error"]["code"] == 404, method
        missing = await rpc(method, ["f" * 32], token=bob)
        assert missing["error"] == {**body["error"], "data": {"purchase_id": "f" * 32}}
    for state in ("fulfilled", "failed", "canceled"):
        body = await rpc("purchase.fulfill", [purchase_id, state, "bob was here"], token=bob)
        assert body["error"]["code"] == 404, state
        # The same answer as for a purchase that does not exist: ids cannot be probed.
        missing = await rpc("purchase.fulfill", ["f" * 32, state], token=bob)
        assert missing["error"]["message"] == body["error"]["message"]
    # A valid payment for alice's purchase does not let bob see or fulfil it either.
    proof = proof_for(alices)
    body = await rpc("purchase.fulfill", [purchase_id, "fulfilled", "", proof], token=bob)
    assert body["error"]["code"] == 404
    assert body["error"]["data"] == {"purchase_id": purchase_id}
    assert await purchase_events(purchase_id) == history

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


# --- staff and the payment backend --------------------------------------------------------


@pytest.mark.parametrize("who", ["staff", "payments"])
async def test_staff_and_payments_see_every_purchase_in_list_and_get(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, who: str
) -> None:
    alices = await create_purchase()
    bobs = await create_purchase("sql-fundamentals", token=world.bob.token)
    staff = getattr(world, who).token

    items = (await rpc("purchase.list", token=staff))["result"]["items"]
    assert items == [bobs, alices]
    filtered = (await rpc("purchase.list", {"state": "pending", "limit": 1}, token=staff))["result"]
    assert filtered["items"] == [bobs]
    for purchase in (alices, bobs):
        assert (await rpc("purchase.get", [purchase["purchase_id"]], token=staff))["result"] == (
            purchase
        )
        events = (await rpc("purchase.events", [purchase["purchase_id"]], token=staff))["result"]
        assert [(e["purchase_id"], e["to_state"]) for e in events] == [
            (purchase["purchase_id"], "pending")
        ]


async def test_staff_fulfills_for_the_owner(
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    engine: AsyncEngine,
    purchase_events: Events,
) -> None:
    # Without a payment: a comp, which the audit trail records as one.
    purchase_id = (await create_purchase())["purchase_id"]
    fulfilled = (
        await rpc("purchase.fulfill", [purchase_id, "fulfilled"], token=world.staff.token)
    )["result"]
    assert fulfilled["purchase"]["state"] == "fulfilled"
    change = (await purchase_events(purchase_id))[-1]
    assert (change["from_state"], change["to_state"]) == ("pending", "fulfilled")
    assert (change["actor_scope"], change["actor_email"]) == ("staff", world.staff.email)
    assert (change["source"], change["evidence"], change["payment_ref"]) == (
        "rpc",
        "staff_comp",
        None,
    )
    # Alice sees that it happened, not who on the desk did it.
    alices_view = (await rpc("purchase.events", [purchase_id], token=world.alice.token))["result"]
    assert alices_view[-1] == {**change, "actor_email": None}

    # The registration is alice's, not the staff member's who asked for it.
    alices = (await rpc("registration.list", token=world.alice.token))["result"]
    assert [r["purchase_id"] for r in alices] == [purchase_id]
    assert (await rpc("registration.list", token=world.staff.token))["result"] == []
    assert (await rpc("registration.list", token=world.bob.token))["result"] == []
    # And the receipt goes to alice.
    async with engine.connect() as connection:
        recipients = (await connection.execute(select(ReceiptOutbox.recipient))).scalars().all()
    assert recipients == [world.alice.email]

    # Alice sees the same purchase, and repeating as alice answers the same (a repeat
    # needs no proof) and adds nothing to the history.
    again = (await rpc("purchase.fulfill", [purchase_id, "fulfilled"], token=world.alice.token))[
        "result"
    ]
    assert again == fulfilled
    assert len(await purchase_events(purchase_id)) == 2


async def test_staff_fulfilling_with_a_proof_is_a_payment_not_a_comp(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, purchase_events: Events
) -> None:
    purchase = await create_purchase(token=world.bob.token)
    purchase_id = purchase["purchase_id"]
    proof = proof_for(purchase, payment_ref="pi_desk")
    fulfilled = (
        await rpc(
            "purchase.fulfill", [purchase_id, "fulfilled", "", proof], token=world.staff.token
        )
    )["result"]
    assert fulfilled["purchase"]["state"] == "fulfilled"
    change = (await purchase_events(purchase_id))[-1]
    assert (change["actor_scope"], change["evidence"], change["payment_ref"]) == (
        "staff",
        "payment_event",
        "pi_desk",
    )
    bobs = (await rpc("registration.list", token=world.bob.token))["result"]
    assert [r["purchase_id"] for r in bobs] == [purchase_id]


async def test_staff_with_a_proof_that_does_not_fit_is_refused_not_comped(
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    purchase_events: Events,
) -> None:
    # A proof, when given, is checked even for staff: a bad one is no comp.
    purchase = await create_purchase()
    other = await create_purchase("sql-fundamentals")
    history = await purchase_events(purchase["purchase_id"])
    counts = await row_counts()
    body = await rpc(
        "purchase.fulfill",
        [purchase["purchase_id"], "fulfilled", "", proof_for(other)],
        token=world.staff.token,
    )
    assert body["error"]["code"] == PAYMENT_NOT_VERIFIED
    assert body["error"]["data"] == {"reason": "mismatch"}
    assert await row_counts() == counts
    assert await purchase_events(purchase["purchase_id"]) == history


# --- batches ----------------------------------------------------------------------------


async def test_batch_with_a_token_authenticates_every_item(
    post: PostRaw, create_purchase: CreatePurchase, world: World
) -> None:
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    batch = [
        request_object("purchase.create", {"course": "sql-fundamentals"}, id=1),
        request_object("purchase.get", [purchase_id], id=2),
        request_object("purchase.list", {"limit": 5}, id=3),
        request_object(
            "purchase.fulfill", [purchase_id, "fulfilled", "", proof_for(purchase)], id=4
        ),
        request_object("registration.list", id=5),
        request_object("course.list", id=6),
        request_object("purchase.events", [purchase_id], id=7),
        *[request_object("purchase.list", id=i) for i in range(8, 20)],
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
