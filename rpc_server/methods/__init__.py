"""The JSON-RPC methods this server offers: the one explicit registry.

Handlers are thin: they get loaded params and the caller, make one domain service call
and return a record; the registry dumps it through the result schema.
"""

from rpc_server.jsonrpc.errors import CONFLICT, NOT_FOUND, PAYMENT_NOT_VERIFIED, UNAUTHENTICATED
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import courses, discovery, examples, purchases, registrations
from schemas import (
    CourseListParams,
    CourseOut,
    DiscoverParams,
    FulfillmentOut,
    PurchaseCreateParams,
    PurchaseEventOut,
    PurchaseEventsParams,
    PurchaseFulfillParams,
    PurchaseGetParams,
    PurchaseListParams,
    PurchaseOut,
    PurchasePageOut,
    RegistrationListParams,
    RegistrationOut,
    RegistrationPageOut,
)

REGISTRY = MethodRegistry(
    [
        RpcMethod(
            "course.list", courses.list_courses, CourseListParams, CourseOut(many=True),
            auth=False, result_name="courses", example=examples.COURSE_LIST,
        ),
        RpcMethod(
            "purchase.create", purchases.create_purchase, PurchaseCreateParams, PurchaseOut(),
            errors=(UNAUTHENTICATED, NOT_FOUND, CONFLICT), result_name="purchase",
            example=examples.PURCHASE_CREATE,
        ),
        RpcMethod(
            "purchase.get", purchases.get_purchase, PurchaseGetParams, PurchaseOut(),
            errors=(UNAUTHENTICATED, NOT_FOUND), result_name="purchase",
            example=examples.PURCHASE_GET,
        ),
        RpcMethod(
            "purchase.list", purchases.list_purchases, PurchaseListParams, PurchasePageOut(),
            errors=(UNAUTHENTICATED,), result_name="page", example=examples.PURCHASE_LIST,
        ),
        RpcMethod(
            "purchase.fulfill", purchases.fulfill_purchase, PurchaseFulfillParams,
            FulfillmentOut(), errors=(UNAUTHENTICATED, PAYMENT_NOT_VERIFIED, NOT_FOUND, CONFLICT),
            result_name="fulfillment", example=examples.PURCHASE_FULFILL,
        ),
        RpcMethod(
            "purchase.events", purchases.list_purchase_events, PurchaseEventsParams,
            PurchaseEventOut(many=True), errors=(UNAUTHENTICATED, NOT_FOUND),
            result_name="events", example=examples.PURCHASE_EVENTS,
        ),
        RpcMethod(
            "registration.list", registrations.list_registrations, RegistrationListParams,
            RegistrationPageOut(), errors=(UNAUTHENTICATED,), result_name="registrations",
            example=examples.REGISTRATION_LIST, result_without_params=RegistrationOut(many=True),
        ),
        RpcMethod(
            "rpc.discover", discovery.discover, DiscoverParams, None, auth=False,
            result_name="OpenRPC document", result_json_schema={"$ref": discovery.META_SCHEMA_URL},
        ),
    ]
)  # fmt: skip
