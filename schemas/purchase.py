"""purchase.create, purchase.get, purchase.list and purchase.fulfill.

``purchase.fulfill`` is the DRF "fulfill" action over JSON-RPC: write-only
``purchase_state`` (a choice) and ``error_msg`` in, read-only ``redirect_url`` (computed)
and the nested ``purchase`` out.
"""

from marshmallow import fields, validate

from rpc_server.domain.records import Backing, Source
from rpc_server.domain.states import REQUESTABLE_STATES, PurchaseState, Scope
from schemas.base import Out, Params
from schemas.fields import Cursor
from schemas.payment import PaymentProof, printable

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
    error_msg = fields.String(validate=[validate.Length(max=1000), printable])
    # Loaded as the SignedPayment it carries (a field, not a post_load hook, so that
    # schemas/loading.py's fast path loads these params).
    payment_proof = PaymentProof()


class PurchaseEventsParams(Params):
    purchase_id = PURCHASE_ID


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


class PurchaseEventOut(Out):
    """One state change: ``from_state`` is null for the creation (or the first event of
    a purchase made before the history was kept); ``actor_scope`` is null for the
    payment webhook; ``actor_email`` is null unless the viewer may see who it was."""

    seq = fields.Integer()
    purchase_id = fields.String()
    from_state = fields.Enum(PurchaseState, by_value=True, allow_none=True)
    to_state = fields.Enum(PurchaseState, by_value=True)
    actor_scope = fields.Enum(Scope, by_value=True, allow_none=True)
    actor_email = fields.String(allow_none=True)
    source = fields.Enum(Source, by_value=True)
    evidence = fields.Enum(Backing, by_value=True, attribute="backing", allow_none=True)
    payment_ref = fields.String(allow_none=True)
    error_msg = fields.String(allow_none=True)
    created_at = fields.DateTime()
