"""Signed payment events for the unit tests, as ``SignedPayment`` records.

Signed by ``tests.payments`` (the ``standardwebhooks`` reference library), never by the
code under test, at the time of a ``FixedClock`` so the verifier of the unit tests
(whose clock is the same ``FixedClock``) sees them as fresh.
"""

from __future__ import annotations

import json
from typing import Any

from rpc_server.domain.records import Purchase, SignedPayment
from tests.payments import TEST_PAYMENT_KEY, event_payload, signed_proof
from tests.unit.fakes import FixedClock


def as_signed(proof: dict[str, Any]) -> SignedPayment:
    """A ``payment_proof`` object as ``purchase.fulfill`` loads it."""
    return SignedPayment(
        message_id=proof["id"],
        timestamp=proof["timestamp"],
        signature=proof["signature"],
        payload=proof["payload"].encode(),
    )


def paid(
    purchase: Purchase,
    clock: FixedClock,
    *,
    payment_ref: str | None = None,
    outcome: str = "payment.succeeded",
    error_message: str | None = None,
    purchase_id: str | None = None,
    amount: str | None = None,
    currency: str | None = None,
    key: str = TEST_PAYMENT_KEY,
    message_id: str | None = None,
    timestamp: int | None = None,
) -> SignedPayment:
    """A payment event for ``purchase`` signed now; by default it pays it exactly."""
    payload = event_payload(
        purchase.purchase_id if purchase_id is None else purchase_id,
        f"{purchase.amount:.2f}" if amount is None else amount,
        purchase.currency if currency is None else currency,
        payment_ref=payment_ref,
        outcome=outcome,
        error_message=error_message,
    )
    moment = int(clock.timestamp()) if timestamp is None else timestamp
    return as_signed(signed_proof(payload, key=key, message_id=message_id, timestamp=moment))


def ref_of(signed: SignedPayment) -> str:
    """The ``payment_ref`` a signed event carries."""
    return str(json.loads(signed.payload)["data"]["payment_ref"])
