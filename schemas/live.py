"""rpc.authenticate, purchase.subscribe, purchase.unsubscribe and the notifications
``purchase.updated`` and ``purchase.resync`` (over a WebSocket only: ``rpc_server.live``)."""

from marshmallow import fields, validate

from rpc_server.domain.states import Scope
from schemas.base import Out, Params
from schemas.purchase import PurchaseEventOut, PurchaseOut

# Sequence numbers are 64-bit integers on every engine.
MAX_SEQ = 2**63 - 1
SUBSCRIPTION_ID = fields.String(
    required=True,
    validate=validate.Regexp(r"^[0-9a-f]{1,64}\Z", error="Not a valid subscription id."),
)


class AuthenticateParams(Params):
    token = fields.String(required=True, validate=validate.Length(min=1, max=256))


class AuthenticatedOut(Out):
    user = fields.String(attribute="email")
    scope = fields.Enum(Scope, by_value=True)


class PurchaseSubscribeParams(Params):
    purchase_id = fields.String(
        validate=validate.Regexp(r"^[0-9a-z]{1,64}\Z", error="Not a valid purchase id.")
    )
    since = fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_SEQ))


class PurchaseUnsubscribeParams(Params):
    subscription = SUBSCRIPTION_ID


class PurchaseUpdateOut(Out):
    """One state change: its sequence number, the event as ``purchase.events`` shows it,
    and the purchase as ``purchase.get`` shows it when the notification is sent."""

    seq = fields.Integer()
    event = fields.Nested(PurchaseEventOut)
    purchase = fields.Nested(PurchaseOut)


class PurchaseResyncOut(Out):
    """Updates could not be replayed from ``since``: read the purchases again; updates
    follow from after ``seq``."""

    seq = fields.Integer()
    reason = fields.String()


__all__ = [
    "AuthenticateParams",
    "AuthenticatedOut",
    "PurchaseResyncOut",
    "PurchaseSubscribeParams",
    "PurchaseUnsubscribeParams",
    "PurchaseUpdateOut",
]
