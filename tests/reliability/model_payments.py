"""Signed payment events for the model-based test, and what the server must make of them.

An event is drawn as a ``ProofSpec``: a set of faults (none, most of the time) and the
choices the faults need. The machine turns it into a ``SentEvent`` for a purchase of its
model (``build_event``): the ``payment_proof`` object it passes to ``purchase.fulfill``
and, through ``tests.payments.webhook_request``, the body and headers it posts to
``POST /webhooks/payments``. The same event may be sent again later, either way.

What verification alone answers is known when the event is built (``verify_refusal``):
the server checks, in this order, the signature header's syntax (``malformed``), the
timestamp (``expired``, both directions) and the signature (``invalid_signature``).
What the payment must fit (``fit_refusal``) depends on the purchase and on the model's
payments at the time of the call: the payload's purchase, the outcome asked for, the
amount and currency as stored (``mismatch``), and, for ``payment.succeeded``, a
``payment_ref`` no other purchase was fulfilled with (``reused``).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from tests.payments import OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY, event_payload, signed_proof

SUCCEEDED, FAILED = "payment.succeeded", "payment.failed"
OUTCOME_STATE = {SUCCEEDED: "fulfilled", FAILED: "failed"}
TOLERANCE_SECONDS = 300  # RPC_SERVER_PAYMENT_TOLERANCE's default

# What can be wrong with an event; each is one way a forged, stale or misdirected
# payment shows up.
FAULTS = (
    "other_purchase",  # a real payment for another purchase (its id, amount and currency)
    "unknown_purchase",  # for a purchase id nobody has
    "wrong_amount",
    "wrong_currency",
    "wrong_outcome",  # payment.failed where payment.succeeded was due, or the reverse
    "reused_ref",  # the payment_ref that already fulfilled some purchase
    "expired",  # signed an hour ago
    "future",  # dated an hour ahead (clocks disagree either way)
    "wrong_key",  # signed with a key the server does not have
    "tampered_payload",  # the amount changed after signing
    "reserialized",  # the same JSON, other bytes (indented) after signing
    "tampered_id",  # the event id changed after signing
    "tampered_timestamp",  # the timestamp moved by a second after signing
    "malformed_signature",  # the signature header is not "v1,<base64>" entries
)
# The order in which the server checks, and the reason each fault is refused with.
VERIFY_ORDER = (
    ("malformed", {"malformed_signature"}),
    ("expired", {"expired", "future"}),
    (
        "invalid_signature",
        {"wrong_key", "tampered_payload", "reserialized", "tampered_id", "tampered_timestamp"},
    ),
)
# The reason a webhook delivery refused by verification gets, as an HTTP status.
WEBHOOK_STATUS = {"malformed": 400, "invalid_signature": 401, "expired": 401}


@dataclass(frozen=True)
class ProofSpec:
    faults: frozenset[str]
    error_message: str | None  # the payment.failed event's message, if any
    pick: int  # which other purchase, or which used payment_ref, a fault takes


# The faults an event is drawn with: first a kind, then one of its kind, so that each
# kind is as likely. Three events in nine are faultless; pairs test which check the
# server makes first.
def _each(*faults: str) -> tuple[frozenset[str], ...]:
    assert set(faults) <= set(FAULTS), faults
    return tuple(frozenset({fault}) for fault in faults)


FAULT_KINDS: tuple[tuple[frozenset[str], ...], ...] = (
    (frozenset(),),
    (frozenset(),),
    (frozenset(),),
    _each("other_purchase", "unknown_purchase", "wrong_amount", "wrong_currency", "wrong_outcome"),
    _each("reused_ref"),
    _each("expired", "future"),
    _each("wrong_key", "malformed_signature"),
    _each("tampered_payload", "reserialized", "tampered_id", "tampered_timestamp"),
    (
        frozenset({"expired", "wrong_key"}),  # the timestamp before the signature
        frozenset({"malformed_signature", "future"}),  # the syntax before the timestamp
        frozenset({"tampered_payload", "other_purchase"}),  # the signature before the payload
        frozenset({"wrong_key", "reused_ref"}),
        frozenset({"other_purchase", "wrong_amount"}),  # the purchase before the amount
        frozenset({"wrong_outcome", "wrong_currency"}),  # the outcome before the currency
        frozenset({"wrong_amount", "reused_ref"}),  # the amount before the payment_ref
        frozenset({"reused_ref", "wrong_outcome"}),
    ),
)
PROOF_SPECS = st.builds(
    ProofSpec,
    faults=st.sampled_from(FAULT_KINDS).flatmap(st.sampled_from),
    error_message=st.sampled_from((None, "card declined", "insufficient funds")),
    pick=st.integers(min_value=0, max_value=7),
)


@dataclass(frozen=True)
class SentEvent:
    """One signed event as sent, and what its payload says."""

    proof: dict[str, Any]  # the payment_proof object; webhook_request(proof) posts it
    purchase_id: str  # the payload's
    outcome: str
    amount: str
    currency: str
    payment_ref: str
    error_message: str | None
    refusal: str | None  # what verification answers (None: it verifies)

    @property
    def event_id(self) -> str:
        return str(self.proof["id"])

    @property
    def requested_state(self) -> str:
        return OUTCOME_STATE[self.outcome]


def verify_refusal(faults: frozenset[str]) -> str | None:
    for reason, causes in VERIFY_ORDER:
        if faults & causes:
            return reason
    return None


def new_payment_ref() -> str:
    return f"pi_{secrets.token_hex(8)}"


def other_currency(currency: str) -> str:
    return "EUR" if currency == "USD" else "USD"


def build_event(
    faults: frozenset[str],
    *,
    purchase_id: str,
    amount: str,
    currency: str,
    outcome: str,
    payment_ref: str,
    error_message: str | None,
) -> SentEvent:
    """Sign a payment event with the payload's fields, then apply the signing faults.

    The payload faults (which purchase, amount, currency, outcome, payment_ref) are the
    caller's to apply to the fields it passes.
    """
    if "wrong_amount" in faults:
        amount = f"{Decimal(amount) + 1:.2f}"
    if "wrong_currency" in faults:
        currency = other_currency(currency)
    if outcome != FAILED:
        error_message = None
    payload = event_payload(
        purchase_id,
        amount,
        currency,
        payment_ref=payment_ref,
        outcome=outcome,
        error_message=error_message,
    )
    now = int(time.time())
    off = 12 * TOLERANCE_SECONDS  # an hour: far outside the tolerance, either way
    moment = now - off if "expired" in faults else now + off if "future" in faults else now
    key = OTHER_PAYMENT_KEY if "wrong_key" in faults else TEST_PAYMENT_KEY
    proof = signed_proof(payload, key=key, timestamp=moment)
    if "tampered_payload" in faults:
        proof["payload"] = payload.replace(f'"amount": "{amount}"', '"amount": "0.01"')
        assert proof["payload"] != payload
    if "reserialized" in faults:
        proof["payload"] = json.dumps(json.loads(payload), indent=1)
    if "tampered_id" in faults:
        proof["id"] = f"evt_{secrets.token_hex(12)}"
    if "tampered_timestamp" in faults:
        proof["timestamp"] = moment + 1
    if "malformed_signature" in faults:
        proof["signature"] = "v1,not-base64!"
    return SentEvent(
        proof=proof,
        purchase_id=purchase_id,
        outcome=outcome,
        amount=amount,
        currency=currency,
        payment_ref=payment_ref,
        error_message=error_message,
        refusal=verify_refusal(faults),
    )


def fit_refusal(
    event: SentEvent,
    *,
    purchase_id: str,
    price: tuple[str, str],
    requested: str,
    holder_of_ref: str | None,
) -> str | None:
    """What a verified event answers for this purchase (its id and stored price) and
    this requested state; ``holder_of_ref`` is the purchase its payment_ref fulfilled."""
    if event.purchase_id != purchase_id:
        return "mismatch"
    if event.requested_state != requested:
        return "mismatch"
    amount, currency = price
    if Decimal(event.amount) != Decimal(amount) or event.currency != currency:
        return "mismatch"
    if event.outcome == SUCCEEDED and holder_of_ref not in (None, purchase_id):
        return "reused"
    return None


# payment_proof objects of the wrong shape: each is invalid params (-32602).
BAD_PROOF_SHAPES = (
    "missing_signature",
    "extra_field",
    "timestamp_as_string",
    "timestamp_as_float",
    "payload_as_object",
    "id_with_space",
    "not_an_object",
)


def misshapen(proof: dict[str, Any], shape: str) -> Any:
    """A copy of ``proof`` bent into ``shape``."""
    bent: dict[str, Any] = dict(proof)
    if shape == "missing_signature":
        del bent["signature"]
    elif shape == "extra_field":
        bent["amount"] = "49.00"
    elif shape == "timestamp_as_string":
        bent["timestamp"] = str(bent["timestamp"])
    elif shape == "timestamp_as_float":
        bent["timestamp"] = bent["timestamp"] + 0.5
    elif shape == "payload_as_object":
        bent["payload"] = json.loads(bent["payload"])
    elif shape == "id_with_space":
        bent["id"] = "evt 1"
    elif shape == "not_an_object":
        return [bent["id"], bent["timestamp"], bent["signature"], bent["payload"]]
    else:
        raise AssertionError(shape)
    return bent
