"""The JSON-RPC methods this server offers: the one explicit registry.

Handlers are thin: they get loaded params and the caller, make one domain service call
and return a record; the registry dumps it through the result schema.
"""

from rpc_server.errors import CONFLICT, NOT_FOUND, UNAUTHENTICATED
from rpc_server.methods import courses, purchases, registrations
from rpc_server.registry import MethodRegistry, RpcMethod
from schemas import (
    CourseListParams,
    CourseOut,
    FulfillmentOut,
    PurchaseCreateParams,
    PurchaseFulfillParams,
    PurchaseGetParams,
    PurchaseListParams,
    PurchaseOut,
    PurchasePageOut,
    RegistrationListParams,
    RegistrationOut,
)

REGISTRY = MethodRegistry(
    [
        RpcMethod(
            "course.list",
            courses.list_courses,
            CourseListParams,
            CourseOut(many=True),
            auth=False,
        ),
        RpcMethod(
            "purchase.create",
            purchases.create_purchase,
            PurchaseCreateParams,
            PurchaseOut(),
            errors=(UNAUTHENTICATED, NOT_FOUND, CONFLICT),
        ),
        RpcMethod(
            "purchase.get",
            purchases.get_purchase,
            PurchaseGetParams,
            PurchaseOut(),
            errors=(UNAUTHENTICATED, NOT_FOUND),
        ),
        RpcMethod(
            "purchase.list",
            purchases.list_purchases,
            PurchaseListParams,
            PurchasePageOut(),
            errors=(UNAUTHENTICATED,),
        ),
        RpcMethod(
            "purchase.fulfill",
            purchases.fulfill_purchase,
            PurchaseFulfillParams,
            FulfillmentOut(),
            errors=(UNAUTHENTICATED, NOT_FOUND, CONFLICT),
        ),
        RpcMethod(
            "registration.list",
            registrations.list_registrations,
            RegistrationListParams,
            RegistrationOut(many=True),
            errors=(UNAUTHENTICATED,),
        ),
    ]
)
