"""Payment proofs in ``purchase.fulfill`` over HTTP (issue 14): who may fulfil, on what.

A buyer fulfils only with a signed payment event (``payment_proof``) that verifies
under a configured key, within the timestamp tolerance, and pays for this purchase as
stored; every refusal is ``402 Payment not verified`` with its exact ``data.reason`` and
writes nothing (the rows of purchases, course_registrations, receipt_outbox and
purchase_events, and every purchase row's content, are compared before and after).
The payments scope fulfils without a proof, staff without one record a comp, a REPEAT
needs no proof and answers byte for byte as before, and a proof-fulfilled purchase gets
exactly one registration and one receipt, delivered to a real SMTP server.

The helpers at the top are plain functions, also used by ``test_webhook.py`` and
``test_purchase_events.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from tests.conftest import FRONTEND_URL, World
from tests.e2e.conftest import INVALID_PARAMS, AppClientFactory, Reply, request_object, send
from tests.integration.smtp_server import SmtpServer, assert_is_receipt, eventually, outbox_rows
from tests.payments import (
    OTHER_PAYMENT_KEY,
    TEST_PAYMENT_KEY,
    event_payload,
    proof_for,
    sign,
    signed_proof,
)

PAYMENT_NOT_VERIFIED = 402
NOT_FOUND = 404
CONFLICT = 409
# Every table a state change writes to.
TABLES = ("purchases", "course_registrations", "receipt_outbox", "purchase_events")
EVIDENCE = {"payment_event", "payments_scope", "staff_comp"}


# --- helpers (plain functions, shared with the other payment test files) ---------------


@dataclass(frozen=True)
class Snapshot:
    """How many rows each written table holds, and every purchase row as stored."""

    counts: dict[str, int]
    purchases: list[tuple[Any, ...]]


async def snapshot(engine: AsyncEngine) -> Snapshot:
    async with engine.connect() as connection:
        counts = {
            table: int(
                (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            )
            for table in TABLES
        }
        rows = await connection.execute(
            text(
                "SELECT purchase_id, state, error_msg, payment_ref, updated_at, fulfilled_at "
                "FROM purchases ORDER BY id"
            )
        )
        return Snapshot(counts, [tuple(row) for row in rows])


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).scalar_one()


async def rows_of(engine: AsyncEngine, purchase_id: str) -> dict[str, int]:
    """Registrations, receipts and events of one purchase."""
    counts = {}
    for table in ("course_registrations", "receipt_outbox", "purchase_events"):
        counts[table] = int(
            await scalar(
                engine,
                f"SELECT count(*) FROM {table} JOIN purchases ON purchases.id = "
                f"{table}.purchase_id WHERE purchases.purchase_id = :purchase_id",
                purchase_id=purchase_id,
            )
        )
    return counts


async def call(
    client: TestClient[Any, Any], method: str, params: Any, *, token: str, id: int = 1
) -> Reply:
    reply = await send(client, request_object(method, params, id), token=token)
    assert reply.status == 200, reply
    return reply


async def fulfill(
    client: TestClient[Any, Any],
    token: str,
    purchase_id: str,
    state: str = "fulfilled",
    *,
    proof: Any = None,
    error_msg: str | None = None,
    id: int = 1,
) -> Reply:
    """One ``purchase.fulfill`` call; the answer unparsed (``.json`` parses it)."""
    params: dict[str, Any] = {"purchase_id": purchase_id, "purchase_state": state}
    if proof is not None:
        params["payment_proof"] = proof
    if error_msg is not None:
        params["error_msg"] = error_msg
    return await call(client, "purchase.fulfill", params, token=token, id=id)


def result_of(reply: Reply) -> Any:
    body = reply.json
    assert "error" not in body, body
    return body["result"]


def error_of(reply: Reply, code: int) -> dict[str, Any]:
    body = reply.json
    assert "result" not in body, body
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def refusal(reply: Reply) -> str:
    """The ``data.reason`` of a 402 Payment not verified answer."""
    error = error_of(reply, PAYMENT_NOT_VERIFIED)
    assert error["message"].startswith("Payment not verified: "), error
    assert set(error["data"]) == {"reason"}, error
    reason: str = error["data"]["reason"]
    return reason


async def create(
    client: TestClient[Any, Any], token: str, course: str = "python-basics", **params: Any
) -> dict[str, Any]:
    reply = await call(client, "purchase.create", {"course": course, **params}, token=token)
    purchase: dict[str, Any] = result_of(reply)
    return purchase


async def get(client: TestClient[Any, Any], token: str, purchase_id: str) -> dict[str, Any]:
    reply = await call(client, "purchase.get", {"purchase_id": purchase_id}, token=token)
    purchase: dict[str, Any] = result_of(reply)
    return purchase


async def events(client: TestClient[Any, Any], token: str, purchase_id: str) -> list[Any]:
    reply = await call(client, "purchase.events", {"purchase_id": purchase_id}, token=token)
    history: list[Any] = result_of(reply)
    return history


def retyped(payload: str, **data: Any) -> str:
    """``payload`` with fields of its ``data`` changed (``type=`` changes the type),
    serialized as ``event_payload`` does: only the changed values differ."""
    document = json.loads(payload)
    if "type" in data:
        document["type"] = data.pop("type")
    document["data"].update(data)
    return json.dumps(document)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def mailing(settings: Settings, smtp_url: str) -> Settings:
    """Settings that deliver receipts to ``smtp_url`` promptly."""
    return replace(
        settings,
        smtp_url=smtp_url,
        mail_retry_base=0.05,
        mail_retry_cap=0.2,
        mail_poll_interval=0.1,
        mail_max_attempts=100,
    )


# --- a buyer needs a proof ----------------------------------------------------------------


async def test_buyer_without_proof_is_refused_missing_and_nothing_is_written(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    assert before.counts == {
        "purchases": 1, "course_registrations": 0, "receipt_outbox": 0, "purchase_events": 1,
    }  # fmt: skip

    reply = await fulfill(client, world.alice.token, purchase["purchase_id"])

    assert refusal(reply) == "missing"
    assert await snapshot(engine) == before
    assert (await get(client, world.alice.token, purchase["purchase_id"]))["state"] == "pending"
    # The same call by position: the same refusal.
    by_position = await call(
        client, "purchase.fulfill", [purchase["purchase_id"], "fulfilled"], token=world.alice.token
    )
    assert refusal(by_position) == "missing"
    assert await snapshot(engine) == before


async def test_buyer_with_a_valid_proof_fulfils_once_with_registration_and_receipt(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase, payment_ref="pi_valid_1")

    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)

    fulfilled = result_of(reply)

    assert fulfilled["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics/start"
    assert fulfilled["purchase"]["state"] == "fulfilled"
    assert fulfilled["purchase"]["fulfilled_at"] is not None
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    assert await scalar(engine, "SELECT payment_ref FROM purchases") == "pi_valid_1"
    history = await events(client, world.alice.token, purchase["purchase_id"])
    assert history[-1]["evidence"] == "payment_event"
    assert history[-1]["payment_ref"] == "pi_valid_1"
    assert history[-1]["actor_scope"] == "buyer"
    assert history[-1]["actor_email"] == "alice@example.com"
    assert history[-1]["source"] == "rpc"
    registrations = result_of(await call(client, "registration.list", {}, token=world.alice.token))
    assert [r["purchase_id"] for r in registrations] == [purchase["purchase_id"]]


async def test_another_buyer_with_a_valid_proof_gets_not_found(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    reply = await fulfill(
        client, world.bob.token, purchase["purchase_id"], proof=proof_for(purchase)
    )
    error_of(reply, NOT_FOUND)
    assert await snapshot(engine) == before


# --- refusals: each with its reason, none writes --------------------------------------------


Tamper = Callable[[dict[str, Any]], dict[str, Any]]


def _payload(change: Callable[[str], str]) -> Tamper:
    return lambda proof: {**proof, "payload": change(proof["payload"])}


def _compact(payload: str) -> str:
    return json.dumps(json.loads(payload), separators=(",", ":"))


def _reordered(payload: str) -> str:
    document = json.loads(payload)
    data = dict(reversed(list(document["data"].items())))
    return json.dumps({"data": data, "type": document["type"]})


def _flip_signature_byte(proof: dict[str, Any]) -> dict[str, Any]:
    version, _, digest = proof["signature"].partition(",")
    flipped = ("B" if digest[0] == "A" else "A") + digest[1:]
    return {**proof, "signature": f"{version},{flipped}"}


TAMPERINGS: dict[str, Tamper] = {
    "amount": _payload(lambda p: retyped(p, amount="1.00")),
    "currency": _payload(lambda p: retyped(p, currency="EUR")),
    "purchase_id": _payload(lambda p: retyped(p, purchase_id="f" * 32)),
    "payment_ref": _payload(lambda p: retyped(p, payment_ref="pi_other")),
    "type": _payload(lambda p: retyped(p, type="payment.failed")),
    "reserialized_compact": _payload(_compact),
    "reserialized_key_order": _payload(_reordered),
    "trailing_space": _payload(lambda p: p + " "),
    "event_id": lambda proof: {**proof, "id": proof["id"] + "x"},
    "timestamp": lambda proof: {**proof, "timestamp": proof["timestamp"] - 1},
    "signature_byte": _flip_signature_byte,
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
async def test_a_proof_changed_after_signing_is_invalid_signature(
    tampering: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    tampered = TAMPERINGS[tampering](proof)
    assert tampered != proof
    if tampering.startswith("reserialized"):
        # The same meaning, other bytes.
        assert json.loads(tampered["payload"]) == json.loads(proof["payload"])
    before = await snapshot(engine)

    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=tampered)

    assert refusal(reply) == "invalid_signature"
    assert await snapshot(engine) == before
    # The proof as signed still fulfils: the refusal was the tampering's doing.
    fulfilled = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert result_of(fulfilled)["purchase"]["state"] == "fulfilled"


async def test_a_proof_signed_with_another_key_is_invalid_signature(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    reply = await fulfill(
        client,
        world.alice.token,
        purchase["purchase_id"],
        proof=proof_for(purchase, key=OTHER_PAYMENT_KEY),
    )
    assert refusal(reply) == "invalid_signature"
    assert await snapshot(engine) == before


@pytest.mark.parametrize("offset", [-301, -400, -86_400, 301, 400, 86_400])
async def test_a_proof_too_old_or_from_the_future_is_expired(
    offset: int, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    # A future timestamp is checked as soon as the proof is made, so the second that
    # may pass before the call reaches the server only moves it towards "now": +301
    # is given +2 of margin.
    offset = offset + 2 if offset == 301 else offset
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    proof = proof_for(purchase, timestamp=int(time.time()) + offset)
    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert refusal(reply) == "expired"
    assert await snapshot(engine) == before


async def test_the_tolerance_applies_in_both_directions_and_follows_the_setting(
    app_client: AppClientFactory, settings: Settings, world: World, engine: AsyncEngine
) -> None:
    client = await app_client(settings=replace(settings, payment_tolerance=20))
    now = int(time.time())
    python = await create(client, world.alice.token)
    sql = await create(client, world.alice.token, "sql-fundamentals")
    before = await snapshot(engine)
    for offset in (-60, 60):
        reply = await fulfill(
            client,
            world.alice.token,
            python["purchase_id"],
            proof=proof_for(python, timestamp=now + offset),
        )
        assert refusal(reply) == "expired", offset
    assert await snapshot(engine) == before
    # Within the tolerance, in the past and in the future: accepted.
    for purchase, offset in ((python, -10), (sql, 10)):
        reply = await fulfill(
            client,
            world.alice.token,
            purchase["purchase_id"],
            proof=proof_for(purchase, timestamp=now + offset),
        )
        assert result_of(reply)["purchase"]["state"] == "fulfilled", offset


async def test_default_tolerance_accepts_a_proof_minutes_old_or_ahead(
    client: TestClient[Any, Any], world: World
) -> None:
    now = int(time.time())
    python = await create(client, world.alice.token)
    sql = await create(client, world.alice.token, "sql-fundamentals")
    for purchase, offset in ((python, -250), (sql, 250)):
        reply = await fulfill(
            client,
            world.alice.token,
            purchase["purchase_id"],
            proof=proof_for(purchase, timestamp=now + offset),
        )
        assert result_of(reply)["purchase"]["state"] == "fulfilled", offset


async def test_a_proof_for_another_purchase_is_mismatch(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    first = await create(client, world.alice.token)
    second = await create(client, world.alice.token)  # the same course: same amount
    bobs = await create(client, world.bob.token)
    before = await snapshot(engine)
    for proof in (proof_for(first), proof_for(bobs)):
        reply = await fulfill(client, world.alice.token, second["purchase_id"], proof=proof)
        assert refusal(reply) == "mismatch"
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("48.00", "USD"), ("49.01", "USD"), ("4900", "USD"), ("49.00", "EUR"), ("39.50", "EUR")],
)
async def test_a_genuine_event_for_another_amount_or_currency_is_mismatch(
    amount: str, currency: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)  # 49.00 USD as stored
    proof = signed_proof(event_payload(purchase["purchase_id"], amount, currency))
    before = await snapshot(engine)
    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert refusal(reply) == "mismatch"
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    ("outcome", "requested"),
    [
        ("payment.failed", "fulfilled"),
        ("payment.succeeded", "failed"),
        ("payment.succeeded", "canceled"),
        ("payment.failed", "canceled"),
    ],
)
async def test_an_event_of_another_outcome_than_requested_is_mismatch(
    outcome: str,
    requested: str,
    client: TestClient[Any, Any],
    world: World,
    engine: AsyncEngine,
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase, outcome=outcome, error_message="declined")
    before = await snapshot(engine)
    reply = await fulfill(
        client, world.alice.token, purchase["purchase_id"], requested, proof=proof
    )
    assert refusal(reply) == "mismatch"
    assert await snapshot(engine) == before


async def test_a_payment_that_fulfilled_another_purchase_is_reused(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    alices = await create(client, world.alice.token)
    bobs = await create(client, world.bob.token)
    alices_sql = await create(client, world.alice.token, "sql-fundamentals")
    paid = await fulfill(
        client,
        world.alice.token,
        alices["purchase_id"],
        proof=proof_for(alices, payment_ref="pi_once"),
    )
    assert result_of(paid)["purchase"]["state"] == "fulfilled"
    before = await snapshot(engine)
    for token, purchase in ((world.bob.token, bobs), (world.alice.token, alices_sql)):
        # A freshly signed event (new id, right amount) carrying the spent payment_ref.
        reply = await fulfill(
            client,
            token,
            purchase["purchase_id"],
            proof=proof_for(purchase, payment_ref="pi_once"),
        )
        assert refusal(reply) == "reused"
    assert await snapshot(engine) == before
    # Bob pays with a payment of his own: fine.
    own = await fulfill(
        client, world.bob.token, bobs["purchase_id"], proof=proof_for(bobs, payment_ref="pi_bob")
    )
    assert result_of(own)["purchase"]["state"] == "fulfilled"


@pytest.mark.parametrize(
    "signature",
    ["garbage", "v1", "v1,", "v1,***", "v1,abc", "v1,abc= v1", "   ", "v1,YWJj\u00e9"],
)
async def test_a_signature_not_of_the_form_v1_base64_is_malformed(
    signature: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = {**proof_for(purchase), "signature": signature}
    before = await snapshot(engine)
    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert refusal(reply) == "malformed"
    assert await snapshot(engine) == before


def _bad_payloads(purchase: dict[str, Any]) -> dict[str, str]:
    good = json.loads(event_payload(purchase["purchase_id"], "49.00", "USD"))
    without_ref = json.loads(json.dumps(good))
    del without_ref["data"]["payment_ref"]
    return {
        "not_json": "paid, honest",
        "json_array": "[]",
        "json_null": "null",
        "unknown_type": json.dumps({**good, "type": "payment.refunded"}),
        "no_data": json.dumps({"type": "payment.succeeded"}),
        "amount_as_number": json.dumps({**good, "data": {**good["data"], "amount": 49.0}}),
        "amount_not_decimal": json.dumps({**good, "data": {**good["data"], "amount": "49,00"}}),
        "no_payment_ref": json.dumps(without_ref),
        "lowercase_currency": json.dumps({**good, "data": {**good["data"], "currency": "usd"}}),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "not_json", "json_array", "json_null", "unknown_type", "no_data", "amount_as_number",
        "amount_not_decimal", "no_payment_ref", "lowercase_currency",
    ],
)  # fmt: skip
async def test_a_correctly_signed_payload_that_is_not_a_payment_event_is_malformed(
    kind: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = signed_proof(_bad_payloads(purchase)[kind])
    before = await snapshot(engine)
    reply = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert refusal(reply) == "malformed"
    assert await snapshot(engine) == before


def _without(field: str) -> Callable[[dict[str, Any]], Any]:
    return lambda proof: {k: v for k, v in proof.items() if k != field}


WRONG_SHAPES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "missing_id": _without("id"),
    "missing_timestamp": _without("timestamp"),
    "missing_signature": _without("signature"),
    "missing_payload": _without("payload"),
    "unknown_field": lambda proof: {**proof, "amount": "49.00"},
    "timestamp_as_string": lambda proof: {**proof, "timestamp": str(proof["timestamp"])},
    "timestamp_as_float": lambda proof: {**proof, "timestamp": proof["timestamp"] + 0.5},
    "timestamp_as_bool": lambda proof: {**proof, "timestamp": True},
    "timestamp_negative": lambda proof: {**proof, "timestamp": -1},
    "payload_as_object": lambda proof: {**proof, "payload": json.loads(proof["payload"])},
    "empty_payload": lambda proof: {**proof, "payload": ""},
    "empty_signature": lambda proof: {**proof, "signature": ""},
    "id_with_space": lambda proof: {**proof, "id": "evt 1"},
    "id_empty": lambda proof: {**proof, "id": ""},
    "signature_with_nul": lambda proof: {**proof, "signature": proof["signature"] + "\x00"},
    "signature_as_list": lambda proof: {**proof, "signature": [proof["signature"]]},
    "proof_as_string": lambda proof: json.dumps(proof),
    "proof_as_list": lambda proof: list(proof.values()),
    "proof_as_null": lambda proof: None,
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
async def test_a_payment_proof_of_the_wrong_json_shape_is_invalid_params(
    shape: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    params = {
        "purchase_id": purchase["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": WRONG_SHAPES[shape](proof_for(purchase)),
    }
    before = await snapshot(engine)
    reply = await call(client, "purchase.fulfill", params, token=world.alice.token)
    error = error_of(reply, INVALID_PARAMS)
    assert "payment_proof" in json.dumps(error.get("data")), error
    assert await snapshot(engine) == before


async def test_without_payment_keys_no_proof_verifies(
    app_client: AppClientFactory, settings: Settings, world: World, engine: AsyncEngine
) -> None:
    client = await app_client(settings=replace(settings, payment_keys=()))
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    for key in (TEST_PAYMENT_KEY, OTHER_PAYMENT_KEY):
        reply = await fulfill(
            client, world.alice.token, purchase["purchase_id"], proof=proof_for(purchase, key=key)
        )
        assert refusal(reply) == "invalid_signature"
    # Staff, too, cannot pass a proof off: a proof given is always verified.
    staff = await fulfill(
        client, world.staff.token, purchase["purchase_id"], proof=proof_for(purchase)
    )
    assert refusal(staff) == "invalid_signature"
    assert await snapshot(engine) == before
    # The payments scope needs no proof, keys or not.
    done = await fulfill(client, world.payments.token, purchase["purchase_id"])
    assert result_of(done)["purchase"]["state"] == "fulfilled"


# --- key rotation ---------------------------------------------------------------------------

OLD_KEY, NEW_KEY = TEST_PAYMENT_KEY, OTHER_PAYMENT_KEY


async def test_while_rotating_either_key_signs_and_a_removed_key_no_longer_does(
    app_client: AppClientFactory, settings: Settings, world: World, engine: AsyncEngine
) -> None:
    rotating = await app_client(settings=replace(settings, payment_keys=(NEW_KEY, OLD_KEY)))
    old_signed = await create(rotating, world.alice.token)
    new_signed = await create(rotating, world.alice.token, "sql-fundamentals")
    for purchase, key in ((old_signed, OLD_KEY), (new_signed, NEW_KEY)):
        reply = await fulfill(
            rotating, world.alice.token, purchase["purchase_id"], proof=proof_for(purchase, key=key)
        )
        assert result_of(reply)["purchase"]["state"] == "fulfilled"

    rotated = await app_client(settings=replace(settings, payment_keys=(NEW_KEY,)))
    bobs = await create(rotated, world.bob.token)
    bobs_sql = await create(rotated, world.bob.token, "sql-fundamentals")
    before = await snapshot(engine)
    old = await fulfill(
        rotated, world.bob.token, bobs["purchase_id"], proof=proof_for(bobs, key=OLD_KEY)
    )
    assert refusal(old) == "invalid_signature"
    assert await snapshot(engine) == before
    new = await fulfill(
        rotated, world.bob.token, bobs["purchase_id"], proof=proof_for(bobs, key=NEW_KEY)
    )
    assert result_of(new)["purchase"]["state"] == "fulfilled"
    # A backend signing with both keys during its own switch-over: one entry matching
    # is enough.
    proof = proof_for(bobs_sql, key=OLD_KEY)
    new_signature = sign(NEW_KEY, proof["id"], proof["timestamp"], proof["payload"])
    both = f"{proof['signature']} {new_signature}"
    reply = await fulfill(
        rotated, world.bob.token, bobs_sql["purchase_id"], proof={**proof, "signature": both}
    )
    assert result_of(reply)["purchase"]["state"] == "fulfilled"


# --- scopes ---------------------------------------------------------------------------------


async def test_payments_scope_fulfils_without_a_proof(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    reply = await fulfill(client, world.payments.token, purchase["purchase_id"])
    fulfilled = result_of(reply)
    assert fulfilled["purchase"]["state"] == "fulfilled"
    assert fulfilled["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics/start"
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    change = (await events(client, world.payments.token, purchase["purchase_id"]))[-1]
    assert change["evidence"] == "payments_scope"
    assert change["actor_scope"] == "payments"
    assert change["actor_email"] == "payments@example.com"
    assert change["payment_ref"] is None
    # The registration is the buyer's, not the payment backend's.
    registrations = result_of(await call(client, "registration.list", {}, token=world.alice.token))
    assert [r["purchase_id"] for r in registrations] == [purchase["purchase_id"]]


async def test_staff_without_a_proof_records_a_comp(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    reply = await fulfill(client, world.staff.token, purchase["purchase_id"])
    assert result_of(reply)["purchase"]["state"] == "fulfilled"
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    change = (await events(client, world.staff.token, purchase["purchase_id"]))[-1]
    assert change["evidence"] == "staff_comp"
    assert change["actor_scope"] == "staff"
    assert change["actor_email"] == "support@example.com"
    assert change["payment_ref"] is None
    assert await scalar(engine, "SELECT payment_ref FROM purchases") is None


async def test_staff_with_a_valid_proof_records_the_payment_event(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase, payment_ref="pi_staff")
    reply = await fulfill(client, world.staff.token, purchase["purchase_id"], proof=proof)
    assert result_of(reply)["purchase"]["state"] == "fulfilled"
    change = (await events(client, world.staff.token, purchase["purchase_id"]))[-1]
    assert change["evidence"] == "payment_event"
    assert change["actor_scope"] == "staff"
    assert change["payment_ref"] == "pi_staff"
    assert await scalar(engine, "SELECT payment_ref FROM purchases") == "pi_staff"
    assert (
        await scalar(
            engine, "SELECT payment_event_id FROM purchase_events WHERE to_state = 'fulfilled'"
        )
        == proof["id"]
    )


@pytest.mark.parametrize("who", ["staff", "payments"])
async def test_a_bad_proof_is_refused_even_from_those_who_need_none(
    who: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    token = getattr(world, who).token
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    cases = {
        "invalid_signature": proof_for(purchase, key=OTHER_PAYMENT_KEY),
        "expired": proof_for(purchase, timestamp=int(time.time()) - 3600),
        "mismatch": signed_proof(event_payload(purchase["purchase_id"], "1.00", "USD")),
    }
    for reason, proof in cases.items():
        reply = await fulfill(client, token, purchase["purchase_id"], proof=proof)
        assert refusal(reply) == reason
    assert await snapshot(engine) == before


# --- repeats, and what a buyer may do without a proof ---------------------------------------


async def test_a_repeat_needs_no_proof_answers_byte_identically_and_writes_nothing(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    pid = purchase["purchase_id"]
    proof = proof_for(purchase)
    first = await fulfill(client, world.alice.token, pid, proof=proof, id=7)
    assert result_of(first)["purchase"]["state"] == "fulfilled"
    after_first = await snapshot(engine)

    without_proof = await fulfill(client, world.alice.token, pid, id=7)
    with_same_proof = await fulfill(client, world.alice.token, pid, proof=proof, id=7)
    by_staff = await fulfill(client, world.staff.token, pid, id=7)
    by_payments = await fulfill(client, world.payments.token, pid, id=7)

    for again in (without_proof, with_same_proof, by_staff, by_payments):
        assert again.text == first.text
    assert await snapshot(engine) == after_first
    # Another id, the same answer otherwise.
    other_id = await fulfill(client, world.alice.token, pid, id=8)
    assert {**other_id.json, "id": 7} == first.json


async def test_a_buyer_cancels_or_fails_an_own_purchase_without_a_proof(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    to_cancel = await create(client, world.alice.token)
    to_fail = await create(client, world.alice.token)
    canceled = await fulfill(client, world.alice.token, to_cancel["purchase_id"], "canceled")
    assert result_of(canceled)["purchase"]["state"] == "canceled"
    failed = await fulfill(
        client, world.alice.token, to_fail["purchase_id"], "failed", error_msg="Card declined"
    )
    assert result_of(failed)["purchase"]["state"] == "failed"
    assert result_of(failed)["purchase"]["error_msg"] == "Card declined"
    assert (await snapshot(engine)).counts == {
        "purchases": 2, "course_registrations": 0, "receipt_outbox": 0, "purchase_events": 4,
    }  # fmt: skip
    for purchase, state in ((to_cancel, "canceled"), (to_fail, "failed")):
        change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
        assert change["to_state"] == state
        assert change["evidence"] is None
        assert change["actor_scope"] == "buyer"
    # A failed purchase still needs a proof to become fulfilled, and takes one.
    before = await snapshot(engine)
    refused = await fulfill(client, world.alice.token, to_fail["purchase_id"])
    assert refusal(refused) == "missing"
    assert await snapshot(engine) == before
    paid = await fulfill(
        client, world.alice.token, to_fail["purchase_id"], proof=proof_for(to_fail)
    )
    assert result_of(paid)["purchase"]["state"] == "fulfilled"
    assert result_of(paid)["purchase"]["error_msg"] is None  # cleared on fulfilment


async def test_a_buyer_reports_a_failure_with_a_signed_failed_event(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    # The signed event's own message is recorded, not what the client says beside it.
    with_message = await create(client, world.alice.token)
    without_message = await create(client, world.alice.token)
    cases = (
        (with_message, "insufficient funds", "insufficient funds"),
        (without_message, None, "Payment failed"),
    )
    for purchase, error_message, recorded in cases:
        proof = proof_for(purchase, outcome="payment.failed", error_message=error_message)
        reply = await fulfill(
            client,
            world.alice.token,
            purchase["purchase_id"],
            "failed",
            proof=proof,
            error_msg="it worked, honest",
        )
        assert result_of(reply)["purchase"]["state"] == "failed"
        assert result_of(reply)["purchase"]["error_msg"] == recorded
        change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
        assert (change["evidence"], change["error_msg"]) == ("payment_event", recorded)
        assert change["payment_ref"] == json.loads(proof["payload"])["data"]["payment_ref"]
    assert await scalar(engine, "SELECT count(*) FROM purchases WHERE payment_ref IS NULL") == 2


@pytest.mark.parametrize(
    "error_msg",
    ["line\nbreak", "carriage\rreturn", "tab\tbetween", "nul\x00", "escape\x1b[31m",
     "bell\x07", "delete\x7f", "line\u2028separator", "bidi\u202eoverride"],
)  # fmt: skip
async def test_error_msg_with_control_characters_is_invalid_params(
    error_msg: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    reply = await fulfill(
        client, world.alice.token, purchase["purchase_id"], "failed", error_msg=error_msg
    )
    error = error_of(reply, INVALID_PARAMS)
    assert "error_msg" in json.dumps(error.get("data")), error
    assert await snapshot(engine) == before


async def test_error_msg_of_printable_text_is_recorded(
    client: TestClient[Any, Any], world: World
) -> None:
    purchase = await create(client, world.alice.token)
    message = "Carte refusée — 3\u2011D Secure échoué (code 05) ✗"
    reply = await fulfill(
        client, world.alice.token, purchase["purchase_id"], "failed", error_msg=message
    )
    assert result_of(reply)["purchase"]["error_msg"] == message


# --- one registration, one receipt, delivered -------------------------------------------------


async def test_a_proof_fulfilled_purchase_gets_one_registration_and_one_delivered_receipt(
    app_client: AppClientFactory,
    settings: Settings,
    smtp: SmtpServer,
    world: World,
    engine: AsyncEngine,
) -> None:
    shop_settings = mailing(settings, smtp.url)
    client = await app_client(settings=shop_settings)
    purchase = await create(client, world.alice.token)
    pid = purchase["purchase_id"]
    proof = proof_for(purchase, payment_ref="pi_mail")

    first = await fulfill(client, world.alice.token, pid, proof=proof)
    assert result_of(first)["purchase"]["state"] == "fulfilled"
    # Everything that could try again: the same proof, no proof, the webhook with the
    # same event, another signed event with the same payment.
    await fulfill(client, world.alice.token, pid, proof=proof)
    await fulfill(client, world.alice.token, pid)
    headers = {
        "webhook-id": proof["id"],
        "webhook-timestamp": str(proof["timestamp"]),
        "webhook-signature": proof["signature"],
    }
    hook = await client.post("/webhooks/payments", data=proof["payload"], headers=headers)
    assert hook.status == 200
    assert (await hook.json())["status"] == "duplicate"
    again = proof_for(purchase, payment_ref="pi_mail")
    await fulfill(client, world.alice.token, pid, proof=again)

    received = await smtp.wait_for(1)
    await eventually(
        lambda: _all_sent(engine), what="the receipt row marked sent"
    )  # the deliverer records the send
    assert len(received) == 1
    assert received[0].rcpt_tos == ("alice@example.com",)
    assert_is_receipt(
        received[0].message,
        settings=shop_settings,
        purchase_id=pid,
        recipient="alice@example.com",
        title="Python Basics",
        amount="49.00",
    )
    assert await rows_of(engine, pid) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    assert len(smtp.received) == 1


async def _all_sent(engine: AsyncEngine) -> bool:
    rows = await outbox_rows(engine)
    return bool(rows) and all(row.status == "sent" for row in rows)
