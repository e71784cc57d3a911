"""Verifying signed payment events (Standard Webhooks v1) with an injected clock.

Events are signed by the ``standardwebhooks`` reference library (``tests.payments``),
so these tests do not depend on the signing code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any

import pytest

from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.records import PaymentEvent, PaymentOutcome, SignedPayment
from rpc_server.payment_signatures import (
    MAX_SIGNATURES,
    PaymentSignatures,
    parse_secret,
    sign,
)
from tests.payments import OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY
from tests.payments import sign as reference_sign

NOW = 1_714_564_800  # 2024-05-01 12:00:00 UTC
PURCHASE_ID = "0123456789abcdef0123456789abcdef"
THIRD_KEY = "whsec_" + base64.b64encode(b"a third key, for rotation 0123456").decode()


def payload_of(**changes: Any) -> str:
    data: dict[str, Any] = {
        "purchase_id": PURCHASE_ID,
        "amount": "49.00",
        "currency": "USD",
        "payment_ref": "pi_123",
    }
    kind = changes.pop("type", "payment.succeeded")
    data.update(changes)
    return json.dumps({"type": kind, "data": data})


PAYLOAD = payload_of()


def signed(
    payload: str | bytes = PAYLOAD,
    *,
    key: str = TEST_PAYMENT_KEY,
    message_id: str = "evt_1",
    timestamp: int = NOW,
    signature: str | None = None,
) -> SignedPayment:
    """An event signed with ``key``; a ``bytes`` payload (maybe not text) is signed by
    hand, over its bytes, as the specification defines it."""
    if signature is None:
        signature = (
            "v1," + raw_signature(key, message_id, timestamp, payload)
            if isinstance(payload, bytes)
            else reference_sign(key, message_id, timestamp, payload)
        )
    raw = payload if isinstance(payload, bytes) else payload.encode()
    return SignedPayment(message_id, timestamp, signature, raw)


def verifier(*keys: str, tolerance: float = 300, now: float = NOW) -> PaymentSignatures:
    return PaymentSignatures(keys, tolerance_seconds=tolerance, clock=lambda: now)


VERIFIER = verifier(TEST_PAYMENT_KEY)


def refused(check: PaymentSignatures, event: SignedPayment) -> str:
    with pytest.raises(PaymentNotVerified) as raised:
        check.verify(event)
    assert raised.value.data == {"reason": raised.value.reason}
    return raised.value.reason


def raw_signature(key: str, message_id: str, timestamp: int, payload: str | bytes) -> str:
    """The base64 HMAC-SHA256 the specification defines, computed by hand."""
    secret = base64.b64decode(key.removeprefix("whsec_"))
    body = payload if isinstance(payload, bytes) else payload.encode()
    content = f"{message_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(secret, content, hashlib.sha256).digest()).decode()


# Valid events.


def test_a_valid_event_verifies() -> None:
    event = VERIFIER.verify(signed())
    assert event == PaymentEvent(
        event_id="evt_1",
        outcome=PaymentOutcome.SUCCEEDED,
        purchase_id=PURCHASE_ID,
        amount=Decimal("49.00"),
        currency="USD",
        payment_ref="pi_123",
        error_message=None,
    )
    assert VERIFIER.configured is True


def test_a_failed_payment_event_carries_its_message() -> None:
    event = VERIFIER.verify(signed(payload_of(type="payment.failed", error_message="declined")))
    assert event.outcome is PaymentOutcome.FAILED
    assert event.outcome.requested_state == "failed"
    assert event.error_message == "declined"


def test_unknown_fields_are_ignored() -> None:
    payload = json.dumps(
        {
            "type": "payment.succeeded",
            "livemode": False,
            "data": {**json.loads(PAYLOAD)["data"], "card": {"last4": "4242"}},
        }
    )
    assert VERIFIER.verify(signed(payload)).payment_ref == "pi_123"


def test_the_reference_signature_is_the_specifications_hmac() -> None:
    """Guards the test helper itself: standardwebhooks signs as the spec says."""
    expected = "v1," + raw_signature(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD)
    assert reference_sign(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD) == expected
    assert sign(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD) == expected


# Tampering.


@pytest.mark.parametrize(
    "tampered",
    [
        payload_of(amount="4.90"),
        payload_of(currency="EUR"),
        payload_of(purchase_id="f" * 32),
        payload_of(payment_ref="pi_other"),
        payload_of(type="payment.failed"),
        # The same JSON, re-serialised: other whitespace, other key order.
        json.dumps(json.loads(PAYLOAD), separators=(",", ":")),
        json.dumps(json.loads(PAYLOAD), indent=2),
        json.dumps(json.loads(PAYLOAD), sort_keys=True),
        json.dumps({"data": json.loads(PAYLOAD)["data"], "type": "payment.succeeded"}),
        PAYLOAD + "\n",
    ],
    ids=["amount", "currency", "purchase-id", "payment-ref", "type", "compact", "indented",
         "sorted-keys", "reordered", "trailing-newline"],
)  # fmt: skip
def test_a_tampered_payload_does_not_verify(tampered: str) -> None:
    assert tampered != PAYLOAD
    original = signed()
    forged = SignedPayment(original.message_id, NOW, original.signature, tampered.encode())
    assert refused(VERIFIER, forged) == "invalid_signature"


def test_a_tampered_message_id_or_timestamp_does_not_verify() -> None:
    original = signed()
    other_id = SignedPayment("evt_2", NOW, original.signature, original.payload)
    other_time = SignedPayment("evt_1", NOW + 1, original.signature, original.payload)
    assert refused(VERIFIER, other_id) == "invalid_signature"
    assert refused(VERIFIER, other_time) == "invalid_signature"


def test_the_wrong_key_does_not_verify() -> None:
    assert refused(VERIFIER, signed(key=OTHER_PAYMENT_KEY)) == "invalid_signature"


def test_no_keys_configured_verifies_nothing() -> None:
    nothing = verifier()
    assert nothing.configured is False
    assert refused(nothing, signed()) == "invalid_signature"
    # Fail closed before looking at anything, even a malformed event.
    assert refused(nothing, signed(signature="garbage")) == "invalid_signature"


# Rotation.


def test_either_of_two_keys_verifies() -> None:
    rotating = verifier(THIRD_KEY, TEST_PAYMENT_KEY)
    assert rotating.verify(signed(key=TEST_PAYMENT_KEY)).event_id == "evt_1"
    assert rotating.verify(signed(key=THIRD_KEY)).event_id == "evt_1"
    assert refused(rotating, signed(key=OTHER_PAYMENT_KEY)) == "invalid_signature"


def test_a_removed_key_no_longer_verifies() -> None:
    rotated = verifier(THIRD_KEY)
    assert rotated.verify(signed(key=THIRD_KEY)).event_id == "evt_1"
    assert refused(rotated, signed(key=TEST_PAYMENT_KEY)) == "invalid_signature"


# Timestamps: within the tolerance of now, in both directions.


@pytest.mark.parametrize("offset", [-300, -299, 0, 299, 300])
def test_timestamps_within_the_tolerance_verify(offset: int) -> None:
    assert VERIFIER.verify(signed(timestamp=NOW + offset)).event_id == "evt_1"


@pytest.mark.parametrize("offset", [-301, 301, -86400, 86400])
def test_timestamps_outside_the_tolerance_are_expired(offset: int) -> None:
    assert refused(VERIFIER, signed(timestamp=NOW + offset)) == "expired"


def test_the_tolerance_is_configurable() -> None:
    strict = verifier(TEST_PAYMENT_KEY, tolerance=10)
    assert strict.verify(signed(timestamp=NOW - 10)).event_id == "evt_1"
    assert refused(strict, signed(timestamp=NOW - 11)) == "expired"
    assert refused(strict, signed(timestamp=NOW + 11)) == "expired"


def test_the_clock_is_read_at_each_verification() -> None:
    moments = iter([NOW, NOW + 301])
    moving = PaymentSignatures((TEST_PAYMENT_KEY,), clock=lambda: next(moments))
    event = signed()
    assert moving.verify(event).event_id == "evt_1"
    assert refused(moving, event) == "expired"


# Malformed events.


@pytest.mark.parametrize(
    "header",
    ["", " ", "v1", "v1,", "v1,!!!", "v1,abc", ",abc", "V1,abc=", "v1;abc=", "v1,YWJj\x00"],
    ids=["empty", "blank", "no-comma", "no-signature", "not-base64", "bad-padding",
         "no-version", "upper-case", "semicolon", "nul"],
)  # fmt: skip
def test_a_malformed_signature_header_is_malformed(header: str) -> None:
    assert refused(VERIFIER, signed(signature=header)) == "malformed"


def test_too_many_signatures_are_malformed() -> None:
    good = reference_sign(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD)
    at_limit = " ".join(["v1,AAAA"] * (MAX_SIGNATURES - 1) + [good])
    assert VERIFIER.verify(signed(signature=at_limit)).event_id == "evt_1"
    over = " ".join(["v1,AAAA"] * MAX_SIGNATURES + [good])
    assert refused(VERIFIER, signed(signature=over)) == "malformed"


@pytest.mark.parametrize("message_id", ["", "evt 1", "evt\n1", "é", "x" * 256])
def test_a_malformed_message_id_is_malformed(message_id: str) -> None:
    event = signed(message_id=message_id)
    assert refused(VERIFIER, event) == "malformed"


def test_a_payload_that_is_not_utf8_is_malformed() -> None:
    raw = b'{"type": "payment.succeeded", "x": "\xff\xfe"}'
    assert refused(VERIFIER, signed(raw)) == "malformed"
    # A lone surrogate, as a proof's payload string may hold one, is not UTF-8 either.
    surrogate = '{"x": "\ud800"}'.encode("utf-8", "surrogatepass")
    assert refused(VERIFIER, signed(surrogate)) == "malformed"


def test_bytes_signed_by_hand_verify_like_the_reference_signature() -> None:
    assert VERIFIER.verify(signed(PAYLOAD.encode())).event_id == "evt_1"


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "{",
        "[]",
        '"payment.succeeded"',
        "null",
        json.dumps({"hello": "world"}),
        json.dumps({"type": "payment.succeeded"}),
        json.dumps({"type": "payment.refunded", "data": json.loads(PAYLOAD)["data"]}),
        json.dumps({"type": "payment.succeeded", "data": "x"}),
        payload_of(payment_ref=""),
        payload_of(payment_ref="pi\n1"),
        payload_of(currency="usd"),
        payload_of(amount="-1.00"),
        payload_of(amount="1e3"),
        payload_of(amount="49.001"),
        payload_of(purchase_id="NOT-AN-ID"),
        payload_of(type="payment.failed", error_message="line\nbreak"),
        "[" * 100_000,
    ],
    ids=["text", "truncated", "array", "string", "null", "other-object", "no-data",
         "unknown-type", "data-not-object", "empty-ref", "control-in-ref", "lower-currency",
         "negative-amount", "exponent-amount", "three-decimals", "bad-purchase-id",
         "control-in-message", "deep-nesting"],
)  # fmt: skip
def test_a_signed_payload_that_is_not_a_payment_event_is_malformed(payload: str) -> None:
    """Correctly signed, so only the payload's content is wrong."""
    assert refused(VERIFIER, signed(payload)) == "malformed"


@pytest.mark.parametrize("amount", [49.0, 49, "49.00 ", None])
def test_an_amount_that_is_not_a_decimal_string_is_malformed(amount: Any) -> None:
    payload = json.dumps(
        {
            "type": "payment.succeeded",
            "data": {**json.loads(PAYLOAD)["data"], "amount": amount},
        }
    )
    assert refused(VERIFIER, signed(payload)) == "malformed"


def test_a_huge_payload_is_malformed() -> None:
    payload = payload_of(note="x" * 300_000)
    assert refused(VERIFIER, signed(payload)) == "malformed"


def test_the_signature_is_checked_before_the_payload_is_parsed() -> None:
    """An unsigned payload that is not even JSON is a bad signature, not malformed."""
    forged = SignedPayment("evt_1", NOW, "v1," + base64.b64encode(b"x" * 32).decode(), b"{")
    assert refused(VERIFIER, forged) == "invalid_signature"


# Several signatures, several versions.


def test_signatures_of_other_versions_are_ignored() -> None:
    digest = raw_signature(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD)
    assert refused(VERIFIER, signed(signature=f"v1a,{digest}")) == "invalid_signature"
    assert refused(VERIFIER, signed(signature=f"v2,{digest}")) == "invalid_signature"
    both = f"v1a,{digest} v1,{digest}"
    assert VERIFIER.verify(signed(signature=both)).event_id == "evt_1"


def test_one_matching_signature_among_several_is_enough() -> None:
    good = reference_sign(TEST_PAYMENT_KEY, "evt_1", NOW, PAYLOAD)
    other = reference_sign(OTHER_PAYMENT_KEY, "evt_1", NOW, PAYLOAD)
    for header in (f"{other} {good}", f"{good} {other}", f"v1,AAAA {good}  v1,BBBB"):
        assert VERIFIER.verify(signed(signature=header)).event_id == "evt_1"
    assert refused(VERIFIER, signed(signature=f"{other} v1,AAAA")) == "invalid_signature"


# Keys.


def test_parse_secret() -> None:
    assert parse_secret(TEST_PAYMENT_KEY) == b"rpc-server test payment key 0123456789"


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "whsec_",
        base64.b64encode(b"k" * 32).decode(),  # no prefix
        "whsec_" + "!!not base64!!",
        "whsec_" + base64.b64encode(b"k" * 15).decode(),  # too short
        "WHSEC_" + base64.b64encode(b"k" * 32).decode(),
    ],
    ids=["empty", "prefix-only", "no-prefix", "not-base64", "too-short", "upper-prefix"],
)
def test_unusable_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_secret(secret)
    with pytest.raises(ValueError):
        PaymentSignatures((TEST_PAYMENT_KEY, secret))
    if len(secret) > len("whsec_"):
        assert secret[len("whsec_") :] not in str(raised.value)


def test_the_shortest_usable_key_is_16_bytes() -> None:
    key = "whsec_" + base64.b64encode(b"k" * 16).decode()
    assert parse_secret(key) == b"k" * 16
    assert verifier(key).verify(signed(key=key)).event_id == "evt_1"
