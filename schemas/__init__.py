"""Marshmallow schemas: what each JSON-RPC method accepts and what it returns.

Inputs are ``*Params`` schemas (every field write-only, unknown fields rejected, so a
server-owned field sent as input is an invalid param); outputs are ``*Out`` schemas
(every field read-only). The field order of a ``*Params`` schema is the positional order
of the method's params.
"""

from schemas.base import Out, Params
from schemas.course import CourseListParams, CourseOut, CourseSaveParams
from schemas.discovery import DiscoverParams
from schemas.live import (
    AuthenticatedOut,
    AuthenticateParams,
    PurchaseResyncOut,
    PurchaseSubscribeParams,
    PurchaseUnsubscribeParams,
    PurchaseUpdateOut,
)
from schemas.payment import PaymentEventPayload, PaymentProofParams
from schemas.purchase import (
    FulfillmentOut,
    PurchaseCreateParams,
    PurchaseEventOut,
    PurchaseEventsParams,
    PurchaseFulfillParams,
    PurchaseGetParams,
    PurchaseListParams,
    PurchaseOut,
    PurchasePageOut,
)
from schemas.registration import RegistrationListParams, RegistrationOut, RegistrationPageOut

__all__ = [
    "AuthenticateParams",
    "AuthenticatedOut",
    "CourseListParams",
    "CourseOut",
    "CourseSaveParams",
    "DiscoverParams",
    "FulfillmentOut",
    "Out",
    "Params",
    "PaymentEventPayload",
    "PaymentProofParams",
    "PurchaseCreateParams",
    "PurchaseEventOut",
    "PurchaseEventsParams",
    "PurchaseFulfillParams",
    "PurchaseGetParams",
    "PurchaseListParams",
    "PurchaseOut",
    "PurchasePageOut",
    "PurchaseResyncOut",
    "PurchaseSubscribeParams",
    "PurchaseUnsubscribeParams",
    "PurchaseUpdateOut",
    "RegistrationListParams",
    "RegistrationOut",
    "RegistrationPageOut",
]
