"""The purchase methods over HTTP: create, get, list, fulfill, registrations, invalid params.

Every rejected call is checked to have written nothing: the rows of purchases,
course_registrations and receipt_outbox are counted before and after.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import FRONTEND_URL, RpcCall, World
from tests.e2e.conftest import (
    INVALID_PARAMS,
    PAYMENT_NOT_VERIFIED,
    Counts,
    CreatePurchase,
    Events,
    Fulfil,
)
from tests.payments import proof_for

PURCHASE_FIELDS = {
    "purchase_id",
    "course",
    "amount",
    "currency",
    "state",
    "error_msg",
    "created_at",
    "updated_at",
    "fulfilled_at",
}


def result_of(body: dict[str, Any]) -> Any:
    assert "error" not in body, body
    return body["result"]


def error_of(body: dict[str, Any], code: int) -> dict[str, Any]:
    assert "result" not in body, body
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def redirect_for(purchase: dict[str, Any]) -> str:
    slug, state = purchase["course"], purchase["state"]
    return {
        "fulfilled": f"{FRONTEND_URL}/courses/{slug}/start",
        "failed": f"{FRONTEND_URL}/checkout/{purchase['purchase_id']}",
        "canceled": f"{FRONTEND_URL}/courses/{slug}",
    }[state]


def cursor_for(text: str) -> str:
    """Encode ``text`` the way the server encodes its opaque cursors."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# --- the flow ---------------------------------------------------------------------------


async def test_create_get_list_fulfill_and_repeat(
    rpc: RpcCall, world: World, row_counts: Counts, purchase_events: Events
) -> None:
    token = world.alice.token
    created = result_of(await rpc("purchase.create", {"course": "python-basics"}, token=token))
    assert set(created) == PURCHASE_FIELDS
    assert created["course"] == "python-basics"
    assert (created["amount"], created["currency"]) == ("49.00", "USD")
    assert created["state"] == "pending"
    assert created["error_msg"] is None
    assert created["fulfilled_at"] is None
    assert created["created_at"] == created["updated_at"]
    assert datetime.fromisoformat(created["created_at"]).utcoffset() is not None
    purchase_id = created["purchase_id"]

    assert result_of(await rpc("purchase.get", {"purchase_id": purchase_id}, token=token)) == (
        created
    )
    assert result_of(await rpc("purchase.get", [purchase_id], token=token)) == created
    page = result_of(await rpc("purchase.list", token=token))
    assert page == {"items": [created], "next_cursor": None}
    after_create = await row_counts()

    # Without evidence of payment the buyer's fulfill is refused and writes nothing.
    unpaid = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    error = error_of(await rpc("purchase.fulfill", unpaid, token=token), PAYMENT_NOT_VERIFIED)
    assert error["message"].startswith("Payment not verified")
    assert error["data"] == {"reason": "missing"}
    assert result_of(await rpc("purchase.get", [purchase_id], token=token)) == created
    assert await row_counts() == after_create

    # The payment step hands the browser a signed payment event; it goes on as the proof.
    proof = proof_for(created, payment_ref="pi_walkthrough")
    fulfilled = result_of(
        await rpc("purchase.fulfill", {**unpaid, "payment_proof": proof}, token=token)
    )
    assert set(fulfilled) == {"redirect_url", "purchase"}
    assert fulfilled["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics/start"
    purchase = fulfilled["purchase"]
    assert purchase["state"] == "fulfilled"
    assert purchase["fulfilled_at"] is not None
    assert purchase["updated_at"] == purchase["fulfilled_at"]
    assert purchase["created_at"] == created["created_at"]
    assert datetime.fromisoformat(purchase["updated_at"]) >= datetime.fromisoformat(
        created["updated_at"]
    )
    assert result_of(await rpc("purchase.get", [purchase_id], token=token)) == purchase
    after_first = await row_counts()
    assert after_first == {"purchases": 1, "course_registrations": 1, "receipt_outbox": 1}

    # Repeating answers the same, with the proof again or (a repeat needs none) without.
    for params in (
        {"purchase_id": purchase_id, "purchase_state": "fulfilled", "payment_proof": proof},
        {"purchase_id": purchase_id, "purchase_state": "fulfilled"},
        [purchase_id, "fulfilled"],
    ):
        again = result_of(await rpc("purchase.fulfill", params, token=token))
        assert again == fulfilled
    assert await row_counts() == after_first

    # The history: created, then fulfilled by alice with the payment event as evidence.
    history = result_of(await rpc("purchase.events", [purchase_id], token=token))
    assert history == await purchase_events(purchase_id)
    assert [(e["from_state"], e["to_state"]) for e in history] == [
        (None, "pending"),
        ("pending", "fulfilled"),
    ]
    assert [(e["actor_email"], e["actor_scope"], e["source"]) for e in history] == [
        (world.alice.email, "buyer", "rpc")
    ] * 2
    assert [(e["evidence"], e["payment_ref"]) for e in history] == [
        (None, None),
        ("payment_event", "pi_walkthrough"),
    ]
    assert history[0]["seq"] < history[1]["seq"]


async def test_amount_and_currency_come_from_the_course(
    create_purchase: CreatePurchase, world: World
) -> None:
    purchase = await create_purchase("sql-fundamentals")
    assert (purchase["amount"], purchase["currency"]) == ("39.50", "EUR")


async def test_create_by_position(rpc: RpcCall, world: World) -> None:
    token = world.alice.token
    created = result_of(await rpc("purchase.create", ["sql-fundamentals", "pos-key"], token=token))
    assert created["course"] == "sql-fundamentals"
    replay = result_of(
        await rpc(
            "purchase.create",
            {"course": "sql-fundamentals", "idempotency_key": "pos-key"},
            token=token,
        )
    )
    assert replay["purchase_id"] == created["purchase_id"]


async def test_list_by_position_follows_schema_order(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    first = await create_purchase()
    second = await create_purchase()
    page = result_of(await rpc("purchase.list", ["pending", 1], token=world.alice.token))
    assert [p["purchase_id"] for p in page["items"]] == [second["purchase_id"]]
    rest = result_of(
        await rpc("purchase.list", ["pending", 1, page["next_cursor"]], token=world.alice.token)
    )
    assert [p["purchase_id"] for p in rest["items"]] == [first["purchase_id"]]


# --- paging and filters -----------------------------------------------------------------


async def test_list_pages_through_everything_newest_first(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    created = [
        (await create_purchase("python-basics" if i % 2 else "sql-fundamentals"))["purchase_id"]
        for i in range(7)
    ]
    await create_purchase(token=world.bob.token)  # someone else's: never listed for alice

    seen: list[str] = []
    page_sizes: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        page = result_of(await rpc("purchase.list", params, token=world.alice.token))
        page_sizes.append(len(page["items"]))
        seen += [p["purchase_id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert page_sizes == [3, 3, 1]
    assert seen == created[::-1]  # newest first, no duplicates, none missing


async def test_full_last_page_has_no_next_cursor(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    for _ in range(6):
        await create_purchase()
    first = result_of(await rpc("purchase.list", {"limit": 3}, token=world.alice.token))
    assert first["next_cursor"] is not None
    second = result_of(
        await rpc(
            "purchase.list", {"limit": 3, "cursor": first["next_cursor"]}, token=world.alice.token
        )
    )
    assert len(second["items"]) == 3
    assert second["next_cursor"] is None


async def test_default_page_is_twenty(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    for _ in range(21):
        await create_purchase()
    page = result_of(await rpc("purchase.list", token=world.alice.token))
    assert len(page["items"]) == 20
    assert page["next_cursor"] is not None


async def test_state_filter(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, fulfil: Fulfil
) -> None:
    token = world.alice.token
    ids = [(await create_purchase())["purchase_id"] for _ in range(5)]
    outcomes = {ids[0]: "fulfilled", ids[1]: "failed", ids[2]: "canceled", ids[3]: "fulfilled"}
    for purchase_id, state in outcomes.items():
        if state == "fulfilled":
            await fulfil(purchase_id)
        else:
            result_of(await rpc("purchase.fulfill", [purchase_id, state], token=token))

    def listed(page: dict[str, Any]) -> list[str]:
        return [p["purchase_id"] for p in page["items"]]

    expected = {
        "pending": [ids[4]],
        "fulfilled": [ids[3], ids[0]],
        "failed": [ids[1]],
        "canceled": [ids[2]],
    }
    for state, purchase_ids in expected.items():
        page = result_of(await rpc("purchase.list", {"state": state}, token=token))
        assert listed(page) == purchase_ids, state
        assert {p["state"] for p in page["items"]} == {state}

    first = result_of(await rpc("purchase.list", {"state": "fulfilled", "limit": 1}, token=token))
    rest = result_of(
        await rpc(
            "purchase.list",
            {"state": "fulfilled", "limit": 1, "cursor": first["next_cursor"]},
            token=token,
        )
    )
    assert listed(first) + listed(rest) == expected["fulfilled"]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "",
        "x" * 65,
        cursor_for("x12"),
        cursor_for("p"),
        cursor_for("p-3"),
        cursor_for("p12a"),
        5,
        None,
        ["p1"],
    ],
)
async def test_invalid_cursor_is_invalid_params_naming_cursor(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, cursor: Any
) -> None:
    await create_purchase()
    body = await rpc("purchase.list", {"cursor": cursor}, token=world.alice.token)
    assert "cursor" in error_of(body, INVALID_PARAMS)["data"]


@pytest.mark.parametrize(
    "decoded",
    [
        pytest.param("p\u00b2", id="superscript-two"),  # str.isdigit() is true, int() fails
        pytest.param("p" + "9" * 19, id="beyond-64-bit"),  # a 19-digit keyset overflows SQLite
    ],
)
async def test_cursor_that_is_not_a_keyset_is_invalid_params(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, decoded: str
) -> None:
    await create_purchase()
    body = await rpc("purchase.list", {"cursor": cursor_for(decoded)}, token=world.alice.token)
    assert "cursor" in error_of(body, INVALID_PARAMS)["data"]


# --- fulfillment outcomes ---------------------------------------------------------------


async def test_failed_records_error_msg_and_repeat_keeps_the_first(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, row_counts: Counts
) -> None:
    token = world.alice.token
    purchase_id = (await create_purchase())["purchase_id"]
    failed = result_of(
        await rpc(
            "purchase.fulfill",
            {"purchase_id": purchase_id, "purchase_state": "failed", "error_msg": "Card declined"},
            token=token,
        )
    )
    assert failed["redirect_url"] == f"{FRONTEND_URL}/checkout/{purchase_id}"
    assert failed["purchase"]["state"] == "failed"
    assert failed["purchase"]["error_msg"] == "Card declined"
    assert failed["purchase"]["fulfilled_at"] is None

    again = result_of(
        await rpc("purchase.fulfill", [purchase_id, "failed", "Insufficient funds"], token=token)
    )
    assert again == failed
    assert result_of(await rpc("purchase.get", [purchase_id], token=token)) == failed["purchase"]
    assert await row_counts() == {"purchases": 1, "course_registrations": 0, "receipt_outbox": 0}


async def test_failed_then_fulfilled(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, row_counts: Counts
) -> None:
    # The buyer's card was declined, then the payment was retried and went through.
    token = world.alice.token
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    result_of(await rpc("purchase.fulfill", [purchase_id, "failed", "Card declined"], token=token))
    counts = await row_counts()
    body = await rpc("purchase.fulfill", [purchase_id, "fulfilled"], token=token)
    assert error_of(body, PAYMENT_NOT_VERIFIED)["data"] == {"reason": "missing"}
    assert await row_counts() == counts
    fulfilled = result_of(
        await rpc(
            "purchase.fulfill",
            [purchase_id, "fulfilled", "ignored", proof_for(purchase)],
            token=token,
        )
    )
    assert fulfilled["purchase"]["state"] == "fulfilled"
    assert fulfilled["purchase"]["fulfilled_at"] is not None
    assert fulfilled["purchase"]["error_msg"] is None
    assert fulfilled["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics/start"
    assert await row_counts() == {"purchases": 1, "course_registrations": 1, "receipt_outbox": 1}
    registrations = result_of(await rpc("registration.list", token=token))
    assert [r["purchase_id"] for r in registrations] == [purchase_id]


async def test_failed_then_canceled(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    token = world.alice.token
    purchase_id = (await create_purchase("sql-fundamentals"))["purchase_id"]
    result_of(await rpc("purchase.fulfill", [purchase_id, "failed"], token=token))
    canceled = result_of(await rpc("purchase.fulfill", [purchase_id, "canceled"], token=token))
    assert canceled["purchase"]["state"] == "canceled"
    assert canceled["redirect_url"] == f"{FRONTEND_URL}/courses/sql-fundamentals"


async def test_canceled_and_repeat(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, row_counts: Counts
) -> None:
    token = world.alice.token
    purchase_id = (await create_purchase())["purchase_id"]
    canceled = result_of(
        await rpc(
            "purchase.fulfill",
            {"purchase_id": purchase_id, "purchase_state": "canceled"},
            token=token,
        )
    )
    assert canceled["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics"
    assert canceled["purchase"]["state"] == "canceled"
    assert canceled["purchase"]["fulfilled_at"] is None
    assert result_of(await rpc("purchase.fulfill", [purchase_id, "canceled"], token=token)) == (
        canceled
    )
    assert await row_counts() == {"purchases": 1, "course_registrations": 0, "receipt_outbox": 0}
    assert result_of(await rpc("registration.list", token=token)) == []


async def test_error_msg_is_recorded_only_for_failed(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    token = world.alice.token
    # fulfilled last: once registered for the course, alice cannot buy it again
    for state in ("canceled", "fulfilled"):
        purchase = await create_purchase()
        params = [purchase["purchase_id"], state, "ignored"]
        if state == "fulfilled":
            params.append(proof_for(purchase))
        answer = result_of(await rpc("purchase.fulfill", params, token=token))
        assert answer["purchase"]["error_msg"] is None, state


async def test_redirect_url_always_matches_the_state(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    for state in ("failed", "canceled", "fulfilled"):
        purchase = await create_purchase()
        params: dict[str, Any] = {"purchase_id": purchase["purchase_id"], "purchase_state": state}
        if state == "fulfilled":
            params["payment_proof"] = proof_for(purchase)
        answer = result_of(await rpc("purchase.fulfill", params, token=world.alice.token))
        assert answer["purchase"]["state"] == state
        assert answer["redirect_url"] == redirect_for(answer["purchase"])


CONFLICTS = [
    ("fulfilled", "failed"),
    ("fulfilled", "canceled"),
    ("canceled", "fulfilled"),
    ("canceled", "failed"),
]


@pytest.mark.parametrize(("current", "requested"), CONFLICTS)
async def test_invalid_transition_is_409_and_changes_nothing(
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    current: str,
    requested: str,
) -> None:
    token = world.alice.token
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    params: list[Any] = [purchase_id, current]
    if current == "fulfilled":
        params += ["", proof_for(purchase)]
    before = result_of(await rpc("purchase.fulfill", params, token=token))
    counts = await row_counts()

    body = await rpc(
        "purchase.fulfill",
        {"purchase_id": purchase_id, "purchase_state": requested, "error_msg": "late"},
        token=token,
    )
    error = error_of(body, 409)
    assert error["data"] == {"current_state": current, "requested_state": requested}
    assert "error_id" not in error["data"]

    assert result_of(await rpc("purchase.get", [purchase_id], token=token)) == before["purchase"]
    assert await row_counts() == counts


# --- idempotency and unknown things -----------------------------------------------------


async def test_same_idempotency_key_and_course_returns_the_same_purchase(
    rpc: RpcCall, world: World, row_counts: Counts
) -> None:
    token = world.alice.token
    params = {"course": "python-basics", "idempotency_key": "checkout-1"}
    first = result_of(await rpc("purchase.create", params, token=token))
    counts = await row_counts()
    for _ in range(3):
        again = result_of(await rpc("purchase.create", params, token=token))
        assert again == first
    page = result_of(await rpc("purchase.list", token=token))
    assert [p["purchase_id"] for p in page["items"]] == [first["purchase_id"]]
    assert await row_counts() == counts


async def test_idempotency_key_replays_the_purchase_as_it_is_now(
    rpc: RpcCall, world: World, fulfil: Fulfil, row_counts: Counts
) -> None:
    token = world.alice.token
    params = {"course": "python-basics", "idempotency_key": "checkout-2"}
    first = result_of(await rpc("purchase.create", params, token=token))
    await fulfil(first)
    again = result_of(await rpc("purchase.create", params, token=token))
    assert again["purchase_id"] == first["purchase_id"]
    assert again["state"] == "fulfilled"
    # Without the key (or with another) it would be a second purchase of a course alice
    # is registered for: refused, and nothing is written.
    counts = await row_counts()
    for other in ({"course": "python-basics"}, {"course": "python-basics", "idempotency_key": "x"}):
        error = error_of(await rpc("purchase.create", other, token=token), 409)
        assert error["message"] == "You are already registered for this course"
        assert error["data"] == {"course": "python-basics"}
    assert await row_counts() == counts
    assert result_of(await rpc("purchase.create", params, token=token)) == again


async def test_same_idempotency_key_for_another_course_is_409(
    rpc: RpcCall, world: World, row_counts: Counts
) -> None:
    token = world.alice.token
    key = "checkout-3"
    result_of(
        await rpc(
            "purchase.create", {"course": "python-basics", "idempotency_key": key}, token=token
        )
    )
    counts = await row_counts()
    body = await rpc(
        "purchase.create", {"course": "sql-fundamentals", "idempotency_key": key}, token=token
    )
    error = error_of(body, 409)
    assert error["data"]["idempotency_key"] == key
    assert await row_counts() == counts


async def test_idempotency_keys_belong_to_their_user(rpc: RpcCall, world: World) -> None:
    params = {"course": "python-basics", "idempotency_key": "shared-key"}
    alices = result_of(await rpc("purchase.create", params, token=world.alice.token))
    bobs = result_of(await rpc("purchase.create", params, token=world.bob.token))
    assert bobs["purchase_id"] != alices["purchase_id"]
    body = await rpc("purchase.get", [bobs["purchase_id"]], token=world.alice.token)
    error_of(body, 404)


async def test_unknown_course_is_404_and_writes_nothing(
    rpc: RpcCall, world: World, row_counts: Counts
) -> None:
    for params in ({"course": "no-such-course"}, {"course": "no-such", "idempotency_key": "k"}):
        body = await rpc("purchase.create", params, token=world.alice.token)
        error_of(body, 404)
    assert await row_counts() == {"purchases": 0, "course_registrations": 0, "receipt_outbox": 0}


@pytest.mark.parametrize("method", ["purchase.get", "purchase.fulfill"])
async def test_unknown_purchase_is_404(
    rpc: RpcCall, world: World, row_counts: Counts, method: str
) -> None:
    params = ["0" * 32] if method == "purchase.get" else ["0" * 32, "fulfilled"]
    error = error_of(await rpc(method, params, token=world.alice.token), 404)
    assert error["data"] == {"purchase_id": "0" * 32}
    assert await row_counts() == {"purchases": 0, "course_registrations": 0, "receipt_outbox": 0}


# --- registrations ----------------------------------------------------------------------


async def test_one_registration_per_fulfilled_purchase_even_after_repeats(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    token = world.alice.token
    assert result_of(await rpc("registration.list", token=token)) == []
    purchase = await create_purchase()
    purchase_id = purchase["purchase_id"]
    proof = proof_for(purchase)
    # Paid, then repeated with the same proof, without one, and by the payment backend.
    for params, caller in (
        ([purchase_id, "fulfilled", "", proof], token),
        ([purchase_id, "fulfilled", "", proof], token),
        ([purchase_id, "fulfilled"], token),
        ([purchase_id, "fulfilled"], world.payments.token),
    ):
        result_of(await rpc("purchase.fulfill", params, token=caller))
    registrations = result_of(await rpc("registration.list", token=token))
    assert len(registrations) == 1
    [registration] = registrations
    assert set(registration) == {"course", "purchase_id", "created_at"}
    assert registration["course"] == "python-basics"
    assert registration["purchase_id"] == purchase_id


async def test_registrations_newest_first(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World, fulfil: Fulfil
) -> None:
    token = world.alice.token
    first = (await create_purchase("python-basics"))["purchase_id"]
    second = (await create_purchase("sql-fundamentals"))["purchase_id"]
    for purchase_id in (first, second):
        await fulfil(purchase_id)
    registrations = result_of(await rpc("registration.list", token=token))
    assert [r["purchase_id"] for r in registrations] == [second, first]
    assert [r["course"] for r in registrations] == ["sql-fundamentals", "python-basics"]


# --- invalid params ---------------------------------------------------------------------

PID = "<purchase_id>"  # replaced with a real purchase id in the test
PROOF = "<proof>"  # replaced with a valid payment_proof for that purchase


def proof_with(**changes: Any) -> dict[str, Any]:
    """A payment_proof of the right shape but for nothing (``None`` drops a field)."""
    proof = {"id": "evt_1", "timestamp": 1_700_000_000, "signature": "v1,AAAA", "payload": "{}"}
    proof.update(changes)
    return {k: v for k, v in proof.items() if v is not None}


INVALID = [
    ("purchase.create", {"course": "python-basics", "extra": 1}, "extra"),
    ("purchase.create", {}, "course"),
    ("purchase.create", {"idempotency_key": "k"}, "course"),
    ("purchase.create", {"course": 5}, "course"),
    ("purchase.create", {"course": None}, "course"),
    ("purchase.create", {"course": ""}, "course"),
    ("purchase.create", {"course": "c" * 101}, "course"),
    ("purchase.create", {"course": ["python-basics"]}, "course"),
    (
        "purchase.create",
        {"course": "python-basics", "idempotency_key": "k" * 65},
        "idempotency_key",
    ),
    ("purchase.create", {"course": "python-basics", "idempotency_key": ""}, "idempotency_key"),
    ("purchase.create", {"course": "python-basics", "idempotency_key": 7}, "idempotency_key"),
    ("purchase.create", {"course": "python-basics", "purchase_id": "a" * 32}, "purchase_id"),
    ("purchase.create", {"course": "python-basics", "state": "fulfilled"}, "state"),
    ("purchase.create", {"course": "python-basics", "amount": "0.01"}, "amount"),
    ("purchase.create", ["python-basics", "key", "extra"], "params"),
    ("purchase.get", {}, "purchase_id"),
    ("purchase.get", {"purchase_id": PID, "course": "python-basics"}, "course"),
    ("purchase.get", {"purchase_id": 12}, "purchase_id"),
    ("purchase.get", {"purchase_id": "NOT VALID!"}, "purchase_id"),
    ("purchase.get", {"purchase_id": "a" * 65}, "purchase_id"),
    ("purchase.get", [PID, "extra"], "params"),
    ("purchase.list", {"limit": 0}, "limit"),
    ("purchase.list", {"limit": 101}, "limit"),
    ("purchase.list", {"limit": "3"}, "limit"),
    ("purchase.list", {"limit": True}, "limit"),
    ("purchase.list", {"limit": 2.5}, "limit"),
    ("purchase.list", {"state": "bogus"}, "state"),
    ("purchase.list", {"owner": "alice@example.com"}, "owner"),
    ("purchase.list", ["pending", 3, None, "extra"], "params"),
    ("purchase.fulfill", {"purchase_id": PID}, "purchase_state"),
    ("purchase.fulfill", {"purchase_state": "fulfilled"}, "purchase_id"),
    ("purchase.fulfill", {"purchase_id": PID, "purchase_state": "pending"}, "purchase_state"),
    ("purchase.fulfill", {"purchase_id": PID, "purchase_state": "done"}, "purchase_state"),
    ("purchase.fulfill", {"purchase_id": PID, "purchase_state": None}, "purchase_state"),
    ("purchase.fulfill", {"purchase_id": PID, "purchase_state": 1}, "purchase_state"),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "failed", "error_msg": "e" * 1001},
        "error_msg",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "failed", "error_msg": {"why": "x"}},
        "error_msg",
    ),
    (
        "purchase.fulfill",
        {
            "purchase_id": PID,
            "purchase_state": "fulfilled",
            "redirect_url": "https://evil.example",
        },
        "redirect_url",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "fulfilled", "purchase": {"state": "fulfilled"}},
        "purchase",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "fulfilled", "fulfilled_at": None},
        "fulfilled_at",
    ),
    ("purchase.fulfill", [PID, "fulfilled", "msg", PROOF, "extra"], "params"),
    ("purchase.fulfill", [PID, "fulfilled", "msg", "extra"], "payment_proof"),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "failed", "error_msg": "two\nlines"},
        "error_msg",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "failed", "error_msg": "nul\x00"},
        "error_msg",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "fulfilled", "payment_proof": None},
        "payment_proof",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "fulfilled", "payment_proof": "v1,AAAA"},
        "payment_proof",
    ),
    (
        "purchase.fulfill",
        {"purchase_id": PID, "purchase_state": "fulfilled", "payment_proof": proof_with(id=None)},
        "payment_proof",
    ),
    (
        "purchase.fulfill",
        {
            "purchase_id": PID,
            "purchase_state": "fulfilled",
            "payment_proof": proof_with(amount="49.00"),
        },
        "payment_proof",
    ),
    (
        "purchase.fulfill",
        {
            "purchase_id": PID,
            "purchase_state": "fulfilled",
            "payment_proof": proof_with(timestamp="1700000000"),
        },
        "payment_proof",
    ),
    (
        "purchase.fulfill",
        {
            "purchase_id": PID,
            "purchase_state": "fulfilled",
            "payment_proof": proof_with(payload={"type": "payment.succeeded"}),
        },
        "payment_proof",
    ),
    ("registration.list", {"course": "python-basics"}, "course"),
    ("registration.list", [20, None, "python-basics"], "params"),
    ("course.list", {"limit": 1}, "limit"),
]


def _with_purchase(params: Any, purchase: dict[str, Any]) -> Any:
    def fill(value: Any) -> Any:
        if value == PID:
            return purchase["purchase_id"]
        return proof_for(purchase) if value == PROOF else value

    if isinstance(params, dict):
        return {k: fill(v) for k, v in params.items()}
    return [fill(v) for v in params]


def _are_messages(value: Any) -> bool:
    """A list of messages, or for a nested object (payment_proof) the same per field."""
    if isinstance(value, dict):
        return bool(value) and all(_are_messages(v) for v in value.values())
    return isinstance(value, list) and all(isinstance(m, str) and m for m in value)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    INVALID,
    ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(INVALID)],
)
async def test_invalid_params_name_the_field_and_write_nothing(
    rpc: RpcCall,
    create_purchase: CreatePurchase,
    world: World,
    row_counts: Counts,
    method: str,
    params: Any,
    field: str,
) -> None:
    token = world.alice.token
    purchase = await create_purchase()
    counts = await row_counts()

    body = await rpc(method, _with_purchase(params, purchase), token=token)
    error = error_of(body, INVALID_PARAMS)
    data = error["data"]
    assert isinstance(data, dict)
    assert field in data, data
    assert all(_are_messages(messages) for messages in data.values()), data

    assert await row_counts() == counts
    assert result_of(await rpc("purchase.get", [purchase["purchase_id"]], token=token)) == purchase


async def test_param_named_like_the_context_argument_is_an_unknown_field(
    rpc: RpcCall, world: World, row_counts: Counts
) -> None:
    # "ctx" is the name of the handlers' context argument inside the server; to a
    # client it is one more unknown param, reported like any other.
    body = await rpc(
        "purchase.create", {"course": "python-basics", "ctx": 1}, token=world.alice.token
    )
    error = error_of(body, INVALID_PARAMS)
    assert error["data"] == {"ctx": ["Unknown field."]}
    assert await row_counts() == {"purchases": 0, "course_registrations": 0, "receipt_outbox": 0}


async def test_longest_valid_strings_are_accepted(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    purchase = await create_purchase(idempotency_key="k" * 64)
    message = "e" * 1000
    failed = result_of(
        await rpc(
            "purchase.fulfill",
            [purchase["purchase_id"], "failed", message],
            token=world.alice.token,
        )
    )
    assert failed["purchase"]["error_msg"] == message


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"course": "\ud800"}, id="course"),
        pytest.param({"course": "python-basics", "idempotency_key": "\udfff"}, id="key"),
    ],
)
async def test_lone_surrogate_in_a_string_param_is_a_client_error(
    rpc: RpcCall, world: World, row_counts: Counts, params: dict[str, Any]
) -> None:
    # Valid JSON ("\ud800" escapes), but not text the database can store: the client
    # sent something wrong, so the answer is a client error, not an internal error.
    body = await rpc("purchase.create", params, token=world.alice.token)
    assert "error" in body
    assert body["error"]["code"] not in (-32603, -32000), body
    assert await row_counts() == {"purchases": 0, "course_registrations": 0, "receipt_outbox": 0}


async def test_lone_surrogate_in_error_msg_is_a_client_error(
    rpc: RpcCall, create_purchase: CreatePurchase, world: World
) -> None:
    purchase = await create_purchase()
    body = await rpc(
        "purchase.fulfill", [purchase["purchase_id"], "failed", "\ud800"], token=world.alice.token
    )
    assert "error" in body
    assert body["error"]["code"] not in (-32603, -32000), body
    assert (
        result_of(await rpc("purchase.get", [purchase["purchase_id"]], token=world.alice.token))
        == purchase
    )
