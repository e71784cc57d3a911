"""The JSON-RPC methods this server offers: the one explicit registry.

Handlers are thin: they get loaded params and the caller, make one domain service call
and return a record; the registry dumps it through the result schema.
"""

from rpc_server.jsonrpc.errors import (
    CONFLICT,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PAYMENT_NOT_VERIFIED,
    UNAUTHENTICATED,
)
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod, ServerNotification
from rpc_server.methods import courses, discovery, examples, live, purchases, registrations
from schemas import (
    AuthenticatedOut,
    AuthenticateParams,
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
    PurchaseResyncOut,
    PurchaseSubscribeParams,
    PurchaseUnsubscribeParams,
    PurchaseUpdateOut,
    RegistrationListParams,
    RegistrationOut,
    RegistrationPageOut,
)

SUBSCRIPTION_ID_SCHEMA = {
    "type": "string",
    "pattern": "^[0-9a-f]{32}$",
    "description": "An opaque subscription id: notifications carry it as params.subscription.",
}

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
            example=examples.PURCHASE_GET, read_ahead=purchases.read_purchase_ahead,
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
            "purchase.subscribe", live.subscribe, PurchaseSubscribeParams, None,
            errors=(UNAUTHENTICATED, NOT_FOUND, CONFLICT, METHOD_NOT_FOUND),
            result_name="subscription", result_json_schema=SUBSCRIPTION_ID_SCHEMA,
            example=examples.PURCHASE_SUBSCRIBE, transport="websocket",
        ),
        RpcMethod(
            "purchase.unsubscribe", live.unsubscribe, PurchaseUnsubscribeParams, None,
            errors=(UNAUTHENTICATED, METHOD_NOT_FOUND), result_name="unsubscribed",
            result_json_schema={"type": "boolean"}, transport="websocket",
        ),
        RpcMethod(
            "rpc.authenticate", live.authenticate, AuthenticateParams, AuthenticatedOut(),
            auth=False, errors=(UNAUTHENTICATED, CONFLICT, METHOD_NOT_FOUND),
            result_name="caller", transport="websocket",
        ),
        RpcMethod(
            "rpc.discover", discovery.discover, DiscoverParams, None, auth=False,
            result_name="OpenRPC document", result_json_schema={"$ref": discovery.META_SCHEMA_URL},
        ),
    ],
    notifications=[
        ServerNotification(
            "purchase.updated",
            "A purchase in a subscription changed state (one notification per change).",
            "Sent to a purchase.subscribe subscription, in seq order, each change once. The "
            "result holds the change's seq, the event as purchase.events shows it, and the "
            "purchase as purchase.get shows it when the notification is sent. Keep the last "
            "seq: resubscribe with it as since after a reconnection.",
            PurchaseUpdateOut(),
            subscribed_by="purchase.subscribe",
        ),
        ServerNotification(
            "purchase.resync",
            "The changes after since cannot be replayed: read the purchases again.",
            "Sent once, first, to a subscription whose since is older than the replay "
            "window; purchase.updated notifications follow for the changes after the "
            "result's seq.",
            PurchaseResyncOut(),
            subscribed_by="purchase.subscribe",
        ),
    ],
)  # fmt: skip
