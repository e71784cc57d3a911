"""Concurrent calls over HTTP on one SQLite file: separate requests and one big batch.

Fulfillment must be idempotent under races: however many requests arrive at once, one
registration and one receipt per purchase, one ``fulfilled`` event in its history,
identical answers, and no "database is locked". The buyer's calls carry the payment
proof (a browser retrying sends the same one again); the payment backend's need none.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import RpcCall, World
from tests.e2e.conftest import Counts, CreatePurchase, Events, Reply, request_object, send
from tests.payments import proof_for

CALLS = 20


async def concurrently(client: TestClient[Any, Any], token: str, calls: list[Any]) -> list[Reply]:
    """Send each call as its own HTTP request, all at once."""
    return list(await asyncio.gather(*(send(client, call, token=token) for call in calls)))


def assert_not_locked(text: str) -> None:
    assert "locked" not in text.lower()
    assert "error_id" not in text


async def assert_changed_once(events: Events, purchase_id: str, to_state: str) -> None:
    """The history holds the creation and exactly one change, to ``to_state``."""
    history = await events(purchase_id)
    assert [(e["from_state"], e["to_state"]) for e in history] == [
        (None, "pending"),
        ("pending", to_state),
    ], history


async def test_concurrent_fulfill_requests_register_once(
    client: TestClient[Any, Any],
    create_purchase: CreatePurchase,
    world: World,
    purchase_rows: Any,
    row_counts: Counts,
    purchase_events: Events,
) -> None:
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    proof = proof_for(purchase)
    calls = [
        request_object("purchase.fulfill", [purchase_id, "fulfilled", "", proof], id=i)
        for i in range(CALLS)
    ]

    replies = await concurrently(client, world.alice.token, calls)

    for reply in replies:
        assert reply.status == 200
        assert_not_locked(reply.text)
    answers = [reply.json for reply in replies]
    assert sorted(a["id"] for a in answers) == list(range(CALLS))
    results = [a.get("result") for a in answers]
    assert all(result == results[0] for result in results), answers
    assert results[0]["purchase"]["state"] == "fulfilled"
    assert await purchase_rows(purchase_id) == {"course_registrations": 1, "receipt_outbox": 1}
    assert await row_counts() == {"purchases": 1, "course_registrations": 1, "receipt_outbox": 1}
    await assert_changed_once(purchase_events, purchase_id, "fulfilled")


async def test_concurrent_fulfill_in_one_batch_registers_once(
    post: Any,
    create_purchase: CreatePurchase,
    world: World,
    purchase_rows: Any,
    purchase_events: Events,
) -> None:
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    params = {
        "purchase_id": purchase_id,
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(purchase),
    }
    batch = [request_object("purchase.fulfill", params, id=i) for i in range(CALLS)]

    reply = await post(batch, token=world.alice.token)

    assert reply.status == 200
    assert_not_locked(reply.text)
    answers = reply.json
    assert sorted(a["id"] for a in answers) == list(range(CALLS))
    results = [a.get("result") for a in answers]
    assert all(result == results[0] for result in results), answers
    assert results[0]["redirect_url"] == "https://shop.example/courses/python-basics/start"
    assert await purchase_rows(purchase_id) == {"course_registrations": 1, "receipt_outbox": 1}
    await assert_changed_once(purchase_events, purchase_id, "fulfilled")


async def test_concurrent_creates_with_one_idempotency_key_make_one_purchase(
    client: TestClient[Any, Any], rpc: RpcCall, world: World, row_counts: Counts
) -> None:
    params = {"course": "python-basics", "idempotency_key": "double-click"}
    calls = [request_object("purchase.create", params, id=i) for i in range(CALLS)]

    replies = await concurrently(client, world.alice.token, calls)

    for reply in replies:
        assert reply.status == 200
        assert_not_locked(reply.text)
    purchase_ids = {reply.json["result"]["purchase_id"] for reply in replies}
    assert len(purchase_ids) == 1
    assert (await row_counts())["purchases"] == 1
    listed = (await rpc("purchase.list", token=world.alice.token))["result"]["items"]
    assert [p["purchase_id"] for p in listed] == list(purchase_ids)


async def test_concurrent_creates_with_one_key_in_one_batch_make_one_purchase(
    post: Any, world: World, row_counts: Counts
) -> None:
    params = {"course": "sql-fundamentals", "idempotency_key": "batch-key"}
    batch = [request_object("purchase.create", params, id=i) for i in range(CALLS)]
    reply = await post(batch, token=world.alice.token)
    assert_not_locked(reply.text)
    assert len({a["result"]["purchase_id"] for a in reply.json}) == 1
    assert (await row_counts())["purchases"] == 1


async def test_racing_outcomes_settle_on_one_state(
    client: TestClient[Any, Any],
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    purchase_rows: Any,
    purchase_events: Events,
) -> None:
    # Half ask for fulfilled (with the payment proof), half for canceled: one wins, the
    # others repeat it or get a 409 naming the winner; side effects only if fulfilled won.
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    proof = proof_for(purchase)
    requested = ["fulfilled", "canceled"] * (CALLS // 2)
    calls = [
        request_object(
            "purchase.fulfill",
            [purchase_id, state, "", proof] if state == "fulfilled" else [purchase_id, state],
            id=i,
        )
        for i, state in enumerate(requested)
    ]

    replies = await concurrently(client, world.alice.token, calls)

    final = (await rpc("purchase.get", [purchase_id], token=world.alice.token))["result"]
    winner = final["state"]
    assert winner in ("fulfilled", "canceled")
    outcomes: Counter[str] = Counter()
    for reply in replies:
        assert_not_locked(reply.text)
        answer = reply.json
        asked = requested[answer["id"]]
        if asked == winner:
            assert answer["result"]["purchase"] == final
            outcomes["same"] += 1
        else:
            assert answer["error"]["code"] == 409
            assert answer["error"]["data"] == {"current_state": winner, "requested_state": asked}
            outcomes["conflict"] += 1
    assert outcomes == {"same": CALLS // 2, "conflict": CALLS // 2}
    expected = 1 if winner == "fulfilled" else 0
    assert await purchase_rows(purchase_id) == {
        "course_registrations": expected,
        "receipt_outbox": expected,
    }
    await assert_changed_once(purchase_events, purchase_id, winner)


async def test_concurrent_fulfills_of_many_purchases(
    client: TestClient[Any, Any],
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    purchase_events: Events,
) -> None:
    # The payment backend (payments scope, no proof needed) fulfils purchases of two
    # buyers, each several times at once.
    purchase_ids = [
        (await create_purchase(course, token=buyer.token))["purchase_id"]
        for buyer in (world.alice, world.bob)
        for course in ("python-basics", "sql-fundamentals")
    ]
    calls = [
        request_object("purchase.fulfill", [purchase_id, "fulfilled"], id=i)
        for i, purchase_id in enumerate(purchase_ids * 5)
    ]
    replies = await concurrently(client, world.payments.token, calls)
    for reply in replies:
        assert_not_locked(reply.text)
        assert reply.json["result"]["purchase"]["state"] == "fulfilled"
    assert await row_counts() == {"purchases": 4, "course_registrations": 4, "receipt_outbox": 4}
    for purchase_id in purchase_ids:
        await assert_changed_once(purchase_events, purchase_id, "fulfilled")
