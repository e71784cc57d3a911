"""purchase.create, purchase.get, purchase.list and purchase.fulfill.

``purchase.fulfill`` is the DRF "fulfill" action over JSON-RPC: write-only
``purchase_state`` (a choice) and ``error_msg`` in, read-only ``redirect_url`` (computed)
and the nested ``purchase`` out.
"""

from marshmallow import fields, validate

from rpc_server.domain.states import REQUESTABLE_STATES, PurchaseState
from schemas.base import Out, Params
from schemas.fields import Cursor

REQUESTABLE = "Must be one of: " + ", ".join(REQUESTABLE_STATES) + "."
PURCHASE_ID = fields.String(
    required=True,
    validate=validate.Regexp(r"^[0-9a-z]{1,64}\Z", error="Not a valid purchase id."),
)
SLUG = fields.String(required=True, validate=validate.Length(min=1, max=100))


class PurchaseCreateParams(Params):
    course = SLUG
    idempotency_key = fields.String(validate=validate.Length(min=1, max=64))


class PurchaseGetParams(Params):
    purchase_id = PURCHASE_ID


class PurchaseListParams(Params):
    state = fields.Enum(PurchaseState, by_value=True)
    limit = fields.Integer(strict=True, validate=validate.Range(min=1, max=100))
    cursor = Cursor()


class PurchaseFulfillParams(Params):
    purchase_id = PURCHASE_ID
    purchase_state = fields.Enum(
        PurchaseState,
        by_value=True,
        required=True,
        error_messages={"unknown": REQUESTABLE},
        validate=validate.OneOf(REQUESTABLE_STATES, error=REQUESTABLE),
    )
    error_msg = fields.String(validate=validate.Length(max=1000))


class PurchaseOut(Out):
    purchase_id = fields.String()
    course = fields.String(attribute="course_slug")
    amount = fields.Decimal(as_string=True, places=2)
    currency = fields.String()
    state = fields.Enum(PurchaseState, by_value=True)
    error_msg = fields.String(allow_none=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    fulfilled_at = fields.DateTime(allow_none=True)


class PurchasePageOut(Out):
    items = fields.List(fields.Nested(PurchaseOut))
    next_cursor = Cursor(attribute="next_before", allow_none=True)


class FulfillmentOut(Out):
    redirect_url = fields.String()
    purchase = fields.Nested(PurchaseOut)
