"""The signed payment event: the ``payment_proof`` param and the event's payload.

A payment event follows Standard Webhooks v1 (https://www.standardwebhooks.com): the
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers over a JSON
payload. ``PaymentProofParams`` is the same event handed on by the browser as a param
of ``purchase.fulfill``; ``PaymentEventPayload`` is what the payload must hold once its
signature has been verified (unknown fields are ignored: providers add their own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from rpc_server.domain.records import PaymentOutcome, SignedPayment
from schemas.base import Params

MAX_PAYLOAD_CHARS = 64 * 1024
# The webhook-id: printable ASCII without spaces (the spec's ids look like "msg_2KWP…").
MESSAGE_ID = validate.Regexp(r"^[\x21-\x7e]{1,255}\Z", error="Not a valid event id.")


def printable(value: str) -> None:
    """Printable text only: no control, format or line-separator characters."""
    if not value.isprintable():
        raise ValidationError("Must be printable text (no control characters).")


class PaymentProofParams(Params):
    """``payment_proof``: a payment event exactly as signed, fields as the headers."""

    id = fields.String(required=True, validate=MESSAGE_ID)
    timestamp = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=2**53)
    )
    signature = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    payload = fields.String(required=True, validate=validate.Length(min=1, max=MAX_PAYLOAD_CHARS))


class PaymentProof(fields.Nested):
    """``payment_proof``: ``PaymentProofParams``, loaded as the ``SignedPayment`` it is."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(PaymentProofParams, **kwargs)

    def _deserialize(
        self,
        value: Any,
        attr: str | None,
        data: Mapping[str, Any] | None,
        partial: bool | Sequence[str] | AbstractSet[str] | None = None,
        **kwargs: Any,
    ) -> SignedPayment:
        proof = super()._deserialize(value, attr, data, partial, **kwargs)
        return SignedPayment(
            message_id=proof["id"],
            timestamp=proof["timestamp"],
            signature=proof["signature"],
            # As signed; text that is not Unicode (a lone surrogate) stays unreadable
            # and is refused by the verifier as malformed.
            payload=proof["payload"].encode("utf-8", "surrogatepass"),
        )


class PaymentEventData(Schema):
    class Meta:
        unknown = EXCLUDE

    purchase_id = fields.String(
        required=True, validate=validate.Regexp(r"^[0-9a-z]{1,64}\Z", error="Not a purchase id.")
    )
    # A decimal string, as the purchase shows it ("49.00"); never a JSON number, whose
    # binary form cannot hold every amount exactly.
    amount = fields.String(
        required=True,
        validate=validate.Regexp(r"^[0-9]{1,10}(\.[0-9]{1,2})?\Z", error="Not an amount."),
    )
    currency = fields.String(
        required=True, validate=validate.Regexp(r"^[A-Z]{3}\Z", error="Not a currency code.")
    )
    payment_ref = fields.String(
        required=True, validate=[validate.Length(min=1, max=255), printable]
    )
    error_message = fields.String(validate=[validate.Length(max=1000), printable])


class PaymentEventPayload(Schema):
    class Meta:
        unknown = EXCLUDE

    type = fields.Enum(PaymentOutcome, by_value=True, required=True)
    data = fields.Nested(PaymentEventData, required=True)

    @post_load
    def flatten(self, payload: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data = payload["data"]
        return {
            "outcome": payload["type"],
            "purchase_id": data["purchase_id"],
            "amount": Decimal(data["amount"]),
            "currency": data["currency"],
            "payment_ref": data["payment_ref"],
            "error_message": data.get("error_message"),
        }
