"""``POST /webhooks/payments`` over HTTP (issue 14): signed payment events from the backend.

The same signed event as a ``payment_proof``, delivered as Standard Webhooks headers and
a raw body. 200 once handled (applied, repeated, duplicate, conflict, or refused as a
mismatch or a reused payment, so the provider stops retrying), 400 malformed, 401 bad
signature or timestamp, 413 too large, 405 for other methods. Every refusal writes
nothing. Whichever of proof and webhook comes first applies; the other repeats, also
when many of each race.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from tests.conftest import World
from tests.e2e.conftest import AppClientFactory
from tests.e2e.test_payments import (
    create,
    events,
    fulfill,
    result_of,
    retyped,
    rows_of,
    scalar,
    snapshot,
)
from tests.payments import (
    OTHER_PAYMENT_KEY,
    TEST_PAYMENT_KEY,
    event_payload,
    proof_for,
    sign,
    signed_proof,
    webhook_request,
)

PATH = "/webhooks/payments"
MAX_BODY_BYTES = 256 * 1024


async def deliver(
    client: TestClient[Any, Any],
    proof: dict[str, Any],
    *,
    headers: Any = None,
    body: bytes | None = None,
) -> tuple[int, Any]:
    """POST the event of ``proof`` to the webhook; return the status and parsed JSON."""
    default_headers, default_body = webhook_request(proof)
    response = await client.post(
        PATH,
        data=default_body if body is None else body,
        headers=default_headers if headers is None else headers,
    )
    assert response.content_type == "application/json", response
    return response.status, await response.json()


def assert_handled(answer: Any, status: str, purchase: dict[str, Any], state: str) -> None:
    assert answer == {"status": status, "purchase_id": purchase["purchase_id"], "state": state}


def assert_refused(answer: Any, reason: str) -> None:
    assert answer["status"] == "refused", answer
    assert answer["reason"] == reason, answer
    assert isinstance(answer["message"], str) and answer["message"], answer


def assert_error(answer: Any, reason: str) -> None:
    assert answer["status"] == "error", answer
    assert answer["reason"] == reason, answer
    assert isinstance(answer["message"], str) and answer["message"], answer


# --- applied, replayed, and proof and webhook together ---------------------------------


async def test_a_succeeded_event_fulfils_the_purchase(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase, payment_ref="pi_hook")

    status, answer = await deliver(client, proof)

    assert status == 200
    assert_handled(answer, "applied", purchase, "fulfilled")
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    assert await scalar(engine, "SELECT payment_ref FROM purchases") == "pi_hook"
    # The owner sees the change as the webhook's: no user, no scope.
    change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
    assert change["from_state"] == "pending"
    assert change["to_state"] == "fulfilled"
    assert change["source"] == "webhook"
    assert change["actor_scope"] is None
    assert change["actor_email"] is None
    assert change["evidence"] == "payment_event"
    assert change["payment_ref"] == "pi_hook"
    assert (
        await scalar(
            engine, "SELECT payment_event_id FROM purchase_events WHERE to_state = 'fulfilled'"
        )
        == proof["id"]
    )
    got = result_of(
        await fulfill(client, world.alice.token, purchase["purchase_id"])  # a REPEAT: no proof
    )
    assert got["purchase"]["state"] == "fulfilled"


async def test_a_replayed_event_id_is_a_duplicate_and_changes_nothing(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    assert (await deliver(client, proof))[0] == 200
    after = await snapshot(engine)
    for _ in range(3):
        status, answer = await deliver(client, proof)
        assert status == 200
        assert_handled(answer, "duplicate", purchase, "fulfilled")
    assert await snapshot(engine) == after


async def test_another_event_of_the_same_payment_after_fulfilment_is_repeated(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    assert (await deliver(client, proof_for(purchase, payment_ref="pi_same")))[0] == 200
    after = await snapshot(engine)
    # The provider re-sends the payment under a new event id.
    status, answer = await deliver(client, proof_for(purchase, payment_ref="pi_same"))
    assert status == 200
    assert_handled(answer, "repeated", purchase, "fulfilled")
    assert await snapshot(engine) == after


async def test_proof_first_then_the_webhook_repeats(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    paid = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    assert result_of(paid)["purchase"]["state"] == "fulfilled"
    after = await snapshot(engine)

    status, answer = await deliver(client, proof)

    assert status == 200
    assert_handled(answer, "duplicate", purchase, "fulfilled")
    assert await snapshot(engine) == after
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
    assert change["source"] == "rpc"  # the proof's change, not the webhook's


async def test_webhook_first_then_the_proof_repeats(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    status, answer = await deliver(client, proof)
    assert status == 200
    assert_handled(answer, "applied", purchase, "fulfilled")
    after = await snapshot(engine)

    with_proof = await fulfill(client, world.alice.token, purchase["purchase_id"], proof=proof)
    without = await fulfill(client, world.alice.token, purchase["purchase_id"])

    assert result_of(with_proof)["purchase"]["state"] == "fulfilled"
    assert with_proof.text == without.text
    assert await snapshot(engine) == after
    change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
    assert change["source"] == "webhook"


async def test_a_failed_event_records_failed_with_its_message(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    failed = proof_for(purchase, outcome="payment.failed", error_message="Card declined (51)")

    status, answer = await deliver(client, failed)

    assert status == 200
    assert_handled(answer, "applied", purchase, "failed")
    got = (await fulfill(client, world.alice.token, purchase["purchase_id"], "failed")).json
    assert got["result"]["purchase"]["error_msg"] == "Card declined (51)"  # a REPEAT
    change = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
    assert (change["to_state"], change["error_msg"], change["source"]) == (
        "failed", "Card declined (51)", "webhook",
    )  # fmt: skip
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 0, "receipt_outbox": 0, "purchase_events": 2,
    }  # fmt: skip
    # The retried payment succeeds: failed -> fulfilled.
    status, answer = await deliver(client, proof_for(purchase))
    assert status == 200
    assert_handled(answer, "applied", purchase, "fulfilled")
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 3,
    }  # fmt: skip


async def test_a_failed_event_without_a_message_records_a_default_one(
    client: TestClient[Any, Any], world: World
) -> None:
    purchase = await create(client, world.alice.token)
    status, answer = await deliver(client, proof_for(purchase, outcome="payment.failed"))
    assert status == 200
    assert_handled(answer, "applied", purchase, "failed")
    stored = (await fulfill(client, world.alice.token, purchase["purchase_id"], "failed")).json
    assert stored["result"]["purchase"]["error_msg"] == "Payment failed"


async def test_an_event_for_a_purchase_that_can_no_longer_take_it_is_a_conflict(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    await fulfill(client, world.alice.token, purchase["purchase_id"], "canceled")
    before = await snapshot(engine)
    status, answer = await deliver(client, proof_for(purchase))
    assert status == 200
    assert_handled(answer, "conflict", purchase, "canceled")
    assert await snapshot(engine) == before


# --- refusals: 200 refused, 401, 400, 413; none writes ---------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency"), [("48.00", "USD"), ("49.00", "EUR"), ("0.01", "USD")]
)
async def test_an_event_for_another_amount_or_currency_is_refused_as_mismatch(
    amount: str, currency: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    proof = signed_proof(event_payload(purchase["purchase_id"], amount, currency))
    status, answer = await deliver(client, proof)
    assert status == 200
    assert_refused(answer, "mismatch")
    assert await snapshot(engine) == before


async def test_an_event_for_an_unknown_purchase_is_refused_as_mismatch(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    await create(client, world.alice.token)
    before = await snapshot(engine)
    proof = signed_proof(event_payload("0" * 32, "49.00", "USD"))
    status, answer = await deliver(client, proof)
    assert status == 200
    assert_refused(answer, "mismatch")
    assert await snapshot(engine) == before


async def test_a_payment_that_fulfilled_another_purchase_is_refused_as_reused(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    alices = await create(client, world.alice.token)
    bobs = await create(client, world.bob.token)
    assert (await deliver(client, proof_for(alices, payment_ref="pi_spent")))[0] == 200
    before = await snapshot(engine)
    status, answer = await deliver(client, proof_for(bobs, payment_ref="pi_spent"))
    assert status == 200
    assert_refused(answer, "reused")
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    "how",
    ["amount", "purchase_id", "type", "reserialized", "event_id", "timestamp", "wrong_key"],
)
async def test_a_tampered_or_wrongly_signed_event_is_401_invalid_signature(
    how: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    other = await create(client, world.bob.token)
    key = OTHER_PAYMENT_KEY if how == "wrong_key" else TEST_PAYMENT_KEY
    proof = proof_for(purchase, key=key)
    payload = proof["payload"]
    changed = {
        "amount": {**proof, "payload": retyped(payload, amount="0.01")},
        "purchase_id": {**proof, "payload": retyped(payload, purchase_id=other["purchase_id"])},
        "type": {**proof, "payload": retyped(payload, type="payment.failed")},
        "reserialized": {**proof, "payload": json.dumps(json.loads(payload), indent=2)},
        "event_id": {**proof, "id": "evt_replaced"},
        "timestamp": {**proof, "timestamp": proof["timestamp"] + 1},
        "wrong_key": proof,
    }[how]
    before = await snapshot(engine)
    status, answer = await deliver(client, changed)
    assert status == 401
    assert_error(answer, "invalid_signature")
    assert await snapshot(engine) == before


@pytest.mark.parametrize("offset", [-400, -3600, 400, 3600])
async def test_an_event_too_old_or_from_the_future_is_401_expired(
    offset: int, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    status, answer = await deliver(client, proof_for(purchase, timestamp=int(time.time()) + offset))
    assert status == 401
    assert_error(answer, "expired")
    assert await snapshot(engine) == before


async def test_without_payment_keys_no_event_is_accepted(
    app_client: AppClientFactory, settings: Settings, world: World, engine: AsyncEngine
) -> None:
    client = await app_client(settings=replace(settings, payment_keys=()))
    purchase = await create(client, world.alice.token)
    before = await snapshot(engine)
    status, answer = await deliver(client, proof_for(purchase))
    assert status == 401
    assert_error(answer, "invalid_signature")
    assert await snapshot(engine) == before


async def test_rotation_old_and_new_keys_verify_and_a_removed_key_does_not(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    old, new = settings.payment_keys[0], OTHER_PAYMENT_KEY
    rotating = await app_client(settings=replace(settings, payment_keys=(new, old)))
    first = await create(rotating, world.alice.token)
    second = await create(rotating, world.alice.token, "sql-fundamentals")
    for purchase, key in ((first, old), (second, new)):
        status, answer = await deliver(rotating, proof_for(purchase, key=key))
        assert (status, answer["status"]) == (200, "applied")
    rotated = await app_client(settings=replace(settings, payment_keys=(new,)))
    third = await create(rotated, world.bob.token)
    status, answer = await deliver(rotated, proof_for(third, key=old))
    assert status == 401
    assert_error(answer, "invalid_signature")
    status, answer = await deliver(rotated, proof_for(third, key=new))
    assert (status, answer["status"]) == (200, "applied")


def _headers(proof: dict[str, Any]) -> dict[str, str]:
    return webhook_request(proof)[0]


def _malformed_requests(proof: dict[str, Any]) -> dict[str, tuple[Any, bytes | None]]:
    """Headers (and body, None: the event's) of deliveries that are not well formed."""
    headers = _headers(proof)
    cases: dict[str, tuple[Any, bytes | None]] = {}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        cases[f"missing_{name}"] = ({k: v for k, v in headers.items() if k != name}, None)
        doubled = CIMultiDict(headers)
        doubled.add(name, headers[name])
        cases[f"twice_{name}"] = (doubled, None)
    for label, value in (
        ("float", f"{proof['timestamp']}.0"),
        ("word", "yesterday"),
        ("negative", f"-{proof['timestamp']}"),
        ("empty", ""),
        ("iso", "2026-01-01T00:00:00Z"),
    ):
        cases[f"timestamp_{label}"] = ({**headers, "webhook-timestamp": value}, None)
    cases["signature_syntax"] = ({**headers, "webhook-signature": "sha256=abc"}, None)
    cases["signature_not_base64"] = ({**headers, "webhook-signature": "v1,abc"}, None)
    cases["event_id_with_space"] = ({**headers, "webhook-id": "evt one"}, None)
    # A payload signed correctly that is not a payment event, and one not even UTF-8.
    for label, payload in (("not_json", "paid"), ("not_an_event", '{"type": "ping"}')):
        signed = {**proof, "payload": payload}
        signed["signature"] = sign_again(signed)
        cases[f"payload_{label}"] = (_headers(signed), payload.encode())
    cases["payload_not_utf8"] = (headers, b"\xff\xfe" + proof["payload"].encode())
    return cases


def sign_again(proof: dict[str, Any]) -> str:
    return sign(TEST_PAYMENT_KEY, proof["id"], proof["timestamp"], proof["payload"])


MALFORMED = [
    "missing_webhook-id", "twice_webhook-id", "missing_webhook-timestamp",
    "twice_webhook-timestamp", "missing_webhook-signature", "twice_webhook-signature",
    "timestamp_float", "timestamp_word", "timestamp_negative", "timestamp_empty",
    "timestamp_iso", "signature_syntax", "signature_not_base64", "event_id_with_space",
    "payload_not_json", "payload_not_an_event", "payload_not_utf8",
]  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_delivery_is_400(
    case: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    cases = _malformed_requests(proof)
    assert sorted(cases) == sorted(MALFORMED)
    headers, body = cases[case]
    before = await snapshot(engine)
    status, answer = await deliver(client, proof, headers=headers, body=body)
    assert status == 400
    assert_error(answer, "malformed")
    assert await snapshot(engine) == before
    # The well-formed delivery of the same event still applies.
    status, answer = await deliver(client, proof)
    assert (status, answer["status"]) == (200, "applied")


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_256_kib_is_413(
    chunked: bool, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    # A signed event padded with an extra field (ignored if it were accepted).
    document = json.loads(event_payload(purchase["purchase_id"], "49.00", "USD"))
    document["padding"] = "x" * MAX_BODY_BYTES
    proof = signed_proof(json.dumps(document))
    body = proof["payload"].encode()
    assert len(body) > MAX_BODY_BYTES
    before = await snapshot(engine)

    async def chunks() -> Any:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    response = await client.post(PATH, data=chunks() if chunked else body, headers=_headers(proof))
    assert response.status == 413
    assert (await response.json())["status"] == "error"
    assert await snapshot(engine) == before


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_other_methods_are_405(
    method: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase)
    before = await snapshot(engine)
    headers, body = webhook_request(proof)
    response = await client.request(method, PATH, data=body, headers=headers)
    assert response.status == 405
    assert "POST" in response.headers.get("Allow", "")
    assert await snapshot(engine) == before


# --- a race in one process (both engines) ------------------------------------------------------


async def test_many_deliveries_and_proofs_of_one_event_at_once_fulfil_exactly_once(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    purchase = await create(client, world.alice.token)
    proof = proof_for(purchase, payment_ref="pi_race")

    async def by_webhook() -> tuple[str, Any]:
        status, answer = await deliver(client, proof)
        assert status == 200, answer
        return "webhook", answer

    async def by_proof(number: int) -> tuple[str, Any]:
        reply = await fulfill(
            client, world.alice.token, purchase["purchase_id"], proof=proof, id=number
        )
        return "proof", reply.json

    calls = [by_webhook() for _ in range(20)] + [by_proof(i) for i in range(20)]
    answers = await asyncio.gather(*calls[::2], *calls[1::2])

    hooks = [answer for way, answer in answers if way == "webhook"]
    proofs = [answer for way, answer in answers if way == "proof"]
    assert len(hooks) == len(proofs) == 20
    for answer in hooks:
        assert answer["status"] in {"applied", "repeated", "duplicate"}, answer
        assert (answer["purchase_id"], answer["state"]) == (purchase["purchase_id"], "fulfilled")
    assert sum(answer["status"] == "applied" for answer in hooks) <= 1
    for answer in proofs:
        assert "result" in answer, answer
        assert answer["result"]["purchase"]["state"] == "fulfilled"
    assert len({json.dumps(answer["result"], sort_keys=True) for answer in proofs}) == 1
    assert await rows_of(engine, purchase["purchase_id"]) == {
        "course_registrations": 1, "receipt_outbox": 1, "purchase_events": 2,
    }  # fmt: skip
    fulfilled_events = await scalar(
        engine, "SELECT count(*) FROM purchase_events WHERE to_state = 'fulfilled'"
    )
    assert fulfilled_events == 1
    assert await scalar(engine, "SELECT payment_ref FROM purchases") == "pi_race"
