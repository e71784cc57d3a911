"""Verifying signed payment events (Standard Webhooks v1), for the proof and the webhook.

One ``PaymentSignatures`` per app, built from ``RPC_SERVER_PAYMENT_KEYS``: the same code
checks a ``payment_proof`` handed on by the browser and a delivery to
``POST /webhooks/payments``. In order, without touching the database:

1. the message id and the ``webhook-signature`` header are well formed (``malformed``);
2. the timestamp is within the tolerance of now, in both directions (``expired``);
3. one ``v1`` signature equals the HMAC-SHA256 of ``"{id}.{timestamp}.{payload}"``
   under one of the configured keys, compared in constant time (``invalid_signature``);
   the raw bytes are verified before anything parses them;
4. the payload is a payment event (``malformed``).

Signing is ``standardwebhooks.Webhook.sign``, the reference library's public API; its
``verify`` is not used because its tolerance is fixed at five minutes and read from the
wall clock, it cannot say which check failed, and malformed headers escape it as
``ValueError`` or ``binascii.Error``. With no key configured, nothing verifies.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError
from standardwebhooks import Webhook

from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.records import PaymentEvent, SignedPayment
from schemas.payment import MAX_PAYLOAD_CHARS, PaymentEventPayload

SECRET_PREFIX = "whsec_"
# At least 128 bits of key (the specification suggests 24 to 64 random bytes).
MIN_SECRET_BYTES = 16
MAX_SIGNATURES = 16
_MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,255}")
_SIGNATURE = re.compile(r"(v[0-9a-z]+),([A-Za-z0-9+/]+={0,2})")
_PAYLOAD = PaymentEventPayload()


def parse_secret(secret: str) -> bytes:
    """Return the key bytes of a ``whsec_<base64>`` secret; raise ValueError if unusable."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a payment key must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a payment key must be whsec_ followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a payment key must hold at least {MIN_SECRET_BYTES} bytes")
    return key


def sign(secret: str, message_id: str, timestamp: int, payload: str) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) of a payment event."""
    return Webhook(parse_secret(secret)).sign(
        msg_id=message_id, timestamp=datetime.fromtimestamp(timestamp, UTC), data=payload
    )


class PaymentSignatures:
    """Verifies payment events against any of the configured keys (rotation: old and
    new both listed while the backend switches)."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        tolerance_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ):
        self._webhooks = [Webhook(parse_secret(secret)) for secret in secrets]
        self.tolerance_seconds = tolerance_seconds
        self._clock = clock

    @property
    def configured(self) -> bool:
        return bool(self._webhooks)

    def verify(self, signed: SignedPayment) -> PaymentEvent:
        if not self._webhooks:
            raise PaymentNotVerified(
                "invalid_signature", "this server has no payment keys, so it accepts no payment"
            )
        if not _MESSAGE_ID.fullmatch(signed.message_id):
            raise PaymentNotVerified("malformed", "the event id is not printable ASCII")
        signatures = _v1_signatures(signed.signature)
        if len(signed.payload) > 4 * MAX_PAYLOAD_CHARS:
            raise PaymentNotVerified("malformed", "the payload is too large")
        try:
            payload = signed.payload.decode()
        except UnicodeDecodeError:
            raise PaymentNotVerified("malformed", "the payload is not UTF-8 text") from None
        if abs(self._clock() - signed.timestamp) > self.tolerance_seconds:
            raise PaymentNotVerified(
                "expired",
                f"the event's timestamp is more than {self.tolerance_seconds:g} s from now",
            )
        moment = datetime.fromtimestamp(signed.timestamp, UTC)
        if not any(
            hmac.compare_digest(expected, given)
            for webhook in self._webhooks
            for expected in [_digest(webhook.sign(signed.message_id, moment, payload))]
            for given in signatures
        ):
            raise PaymentNotVerified("invalid_signature", "no signature matches a payment key")
        return _event(signed.message_id, payload)


def _v1_signatures(header: str) -> list[bytes]:
    """The ``v1`` signatures of a ``webhook-signature`` value (others are ignored)."""
    entries = header.split()
    if not entries or len(entries) > MAX_SIGNATURES:
        raise PaymentNotVerified("malformed", "the signature is not 'v1,<base64>' entries")
    signatures = []
    for entry in entries:
        match = _SIGNATURE.fullmatch(entry)
        if match is None:
            raise PaymentNotVerified("malformed", "the signature is not 'v1,<base64>' entries")
        if match[1] == "v1":
            try:
                signatures.append(base64.b64decode(match[2], validate=True))
            except binascii.Error:
                raise PaymentNotVerified("malformed", "a signature is not base64") from None
    return signatures


def _digest(signature: str) -> bytes:
    return base64.b64decode(signature.partition(",")[2])


def _event(message_id: str, payload: str) -> PaymentEvent:
    try:
        document: Any = json.loads(payload)
        loaded = _PAYLOAD.load(document)
    except (ValueError, RecursionError, ValidationError):
        raise PaymentNotVerified(
            "malformed", "the payload is not a payment.succeeded or payment.failed event"
        ) from None
    return PaymentEvent(event_id=message_id, **loaded)
