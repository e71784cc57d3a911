"""Signed payment events for tests: what the shop's payment backend would send.

``proof_for(purchase)`` signs a ``payment.succeeded`` event for a purchase as
``purchase.create``/``purchase.get`` serialized it, ready to pass as ``payment_proof``;
``webhook_request(proof)`` turns the same event into the headers and body of a
``POST /webhooks/payments``. Signing goes through ``standardwebhooks`` (the reference
implementation), not through the code under test.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

# The key the test settings configure (RPC_SERVER_PAYMENT_KEYS), and one they do not.
TEST_PAYMENT_KEY = "whsec_" + base64.b64encode(b"rpc-server test payment key 0123456789").decode()
OTHER_PAYMENT_KEY = "whsec_" + base64.b64encode(b"some other payment key 9876543210xyz").decode()


def sign(key: str, message_id: str, timestamp: int, payload: str) -> str:
    """The ``webhook-signature`` value of an event, as Standard Webhooks defines it."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return Webhook(key).sign(msg_id=message_id, timestamp=moment, data=payload)


def event_payload(
    purchase_id: str,
    amount: str,
    currency: str,
    *,
    payment_ref: str | None = None,
    outcome: str = "payment.succeeded",
    error_message: str | None = None,
) -> str:
    data: dict[str, Any] = {
        "purchase_id": purchase_id,
        "amount": amount,
        "currency": currency,
        "payment_ref": payment_ref or f"pi_{secrets.token_hex(8)}",
    }
    if error_message is not None:
        data["error_message"] = error_message
    return json.dumps({"type": outcome, "data": data})


def signed_proof(
    payload: str,
    *,
    key: str = TEST_PAYMENT_KEY,
    message_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A ``payment_proof`` object: the event's id, timestamp, signature and payload."""
    message_id = message_id or f"evt_{secrets.token_hex(12)}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "id": message_id,
        "timestamp": timestamp,
        "signature": sign(key, message_id, timestamp, payload),
        "payload": payload,
    }


def proof_for(
    purchase: dict[str, Any],
    *,
    payment_ref: str | None = None,
    outcome: str = "payment.succeeded",
    error_message: str | None = None,
    key: str = TEST_PAYMENT_KEY,
    message_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A signed event paying for ``purchase`` (a serialized purchase) exactly."""
    payload = event_payload(
        purchase["purchase_id"],
        purchase["amount"],
        purchase["currency"],
        payment_ref=payment_ref,
        outcome=outcome,
        error_message=error_message,
    )
    return signed_proof(payload, key=key, message_id=message_id, timestamp=timestamp)


def webhook_request(proof: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The headers and body of ``POST /webhooks/payments`` carrying the same event."""
    headers = {
        "webhook-id": proof["id"],
        "webhook-timestamp": str(proof["timestamp"]),
        "webhook-signature": proof["signature"],
        "Content-Type": "application/json",
    }
    return headers, proof["payload"].encode()
