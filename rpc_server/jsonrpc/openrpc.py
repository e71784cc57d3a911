"""The OpenRPC document: generated from the method registry and the Marshmallow schemas.

Nothing here is written twice. Each method's name, summary (its handler's docstring),
params (the fields of its ``*Params`` schema, in positional order), result (its ``*Out``
schema), errors (its declared codes plus the standard ones every method can return) and
example (params it declares, result dumped through its own result schema) come from the
registry. Marshmallow fields become JSON Schema through apispec's converter, taught here
the few things it does not know about our fields.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.field_converter import FieldConverterMixin
from marshmallow import Schema, fields

from rpc_server import __version__
from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.jsonrpc.errors import ERROR_MESSAGES, PAYMENT_NOT_VERIFIED, STANDARD_METHOD_ERRORS
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod, ServerNotification
from schemas.fields import Cursor

OPENRPC_VERSION = "1.3.2"

# What an error's ``data`` holds, where every answer with that code carries the same shape
# (OpenRPC leaves the meaning of an error object's ``data`` to the server: here, a JSON
# Schema of it).
ERROR_DATA: dict[int, dict[str, Any]] = {
    PAYMENT_NOT_VERIFIED: {
        "type": "object",
        "required": ["reason"],
        "properties": {
            "reason": {
                "enum": list(PaymentNotVerified.REASONS),
                "description": "missing: no payment_proof where one is needed; "
                "invalid_signature: no configured key signed it (or none is configured); "
                "expired: its timestamp is too far from now; mismatch: it pays for another "
                "purchase, amount or currency, or its type does not fit purchase_state; "
                "reused: its payment_ref already paid for another purchase; "
                "malformed: not a well-formed signed payment event",
            }
        },
    },
}


def _decimal_as_string(
    self: FieldConverterMixin, field: fields.Field[Any], **kwargs: Any
) -> dict[str, Any]:
    """``Decimal(as_string=True)`` is sent as a string such as "49.00", not a number."""
    if isinstance(field, fields.Decimal) and field.as_string:
        return {"type": ["string", "null"] if field.allow_none else "string",
                "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}  # fmt: skip
    return {}


def _cursor(self: FieldConverterMixin, field: fields.Field[Any], **kwargs: Any) -> dict[str, Any]:
    if isinstance(field, Cursor):
        return {"type": ["string", "null"] if field.allow_none else "string",
                "description": "Opaque: pass next_cursor back unchanged."}  # fmt: skip
    return {}


def _enum_choices(
    self: FieldConverterMixin, field: fields.Field[Any], **kwargs: Any
) -> dict[str, Any]:
    """An Enum field narrowed by a OneOf validator accepts only the narrowed values."""
    if not isinstance(field, fields.Enum):
        return {}
    for validator in field.validators:
        choices = getattr(validator, "choices", None)
        if choices is not None:
            return {"enum": [c.value if isinstance(c, Enum) else c for c in choices]}
    return {}


def _ecma_pattern(
    self: FieldConverterMixin, field: fields.Field[Any], ret: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """Python's end-of-string ``\\Z`` is ``$`` in the ECMA 262 regexes JSON Schema uses."""
    pattern = ret.get("pattern")
    if isinstance(pattern, str) and pattern.endswith("\\Z"):
        return {"pattern": re.sub(r"\\Z$", "$", pattern)}
    return {}


class OpenRpcBuilder:
    def __init__(self, registry: MethodRegistry, *, title: str, description: str, server_url: str):
        self.registry = registry
        self.server_url = server_url
        self.plugin = MarshmallowPlugin(schema_name_resolver=self._schema_name)
        self.spec = APISpec(
            title=title, version=__version__, openapi_version="3.1.0", plugins=[self.plugin]
        )
        converter = self.plugin.converter
        assert converter is not None
        for function in (_decimal_as_string, _cursor, _enum_choices, _ecma_pattern):
            converter.add_attribute_function(function)  # type: ignore[no-untyped-call]
        self.converter = converter
        self.title = title
        self.description = description

    @staticmethod
    def _schema_name(schema: type[Schema] | Schema) -> str:
        cls = schema if isinstance(schema, type) else type(schema)
        return cls.__name__.removesuffix("Out")

    def _schema(self, schema: Schema) -> dict[str, Any]:
        """JSON Schema of an output schema; nested schemas go to components."""
        name = self._schema_name(schema)
        if name not in self.spec.components.schemas:
            self.spec.components.schema(name, schema=type(schema))
        reference = {"$ref": f"#/components/schemas/{name}"}
        return {"type": "array", "items": reference} if schema.many else reference

    def method(self, method: RpcMethod) -> dict[str, Any]:
        params_schema = method.params()
        properties = self.converter.schema2jsonschema(params_schema)["properties"]  # type: ignore[no-untyped-call]
        params = [
            {
                "name": name,
                "required": field.required,
                "schema": properties[name],
                **({"description": d} if (d := field.metadata.get("description")) else {}),
            }
            for name, field in params_schema.load_fields.items()
        ]
        if method.result_json_schema is not None:
            result_schema = method.result_json_schema
        else:
            assert method.result is not None, f"{method.name} has no result schema"
            result_schema = self._schema(method.result)
            if method.result_without_params is not None:
                without = self._schema(method.result_without_params)
                result_schema = {"oneOf": [without, result_schema]}
        codes = (*method.errors, *STANDARD_METHOD_ERRORS)
        document: dict[str, Any] = {
            "name": method.name,
            "summary": method.summary,
            "paramStructure": "either",
            "params": params,
            "result": {"name": method.result_name, "schema": result_schema},
            "errors": [self._error(code) for code in codes],
        }
        if method.description:
            document["description"] = method.description
        if method.example is not None:
            document["examples"] = [self._example(method)]
        if method.transport == "websocket":
            document["servers"] = [self._websocket_server()]
            document["x-transport"] = "websocket"
        return document

    def _websocket_server(self) -> dict[str, Any]:
        scheme, rest = self.server_url.split("://", 1)
        return {
            "name": "this server over a WebSocket",
            "url": f"{'wss' if scheme == 'https' else 'ws'}://{rest}",
            "description": "GET /rpc with Upgrade: websocket; JSON-RPC 2.0 in text frames.",
        }

    def notification(self, notification: ServerNotification) -> dict[str, Any]:
        """A notification the server sends, as OpenRPC 1.3 can say it: a method without a
        result (what the specification calls a notification), marked with the ``x-``
        extensions ``x-notification: "server-to-client"`` and ``x-subscription`` (the
        method that subscribes). OpenRPC has no construct for subscriptions."""
        return {
            "name": notification.name,
            "summary": notification.summary,
            "description": notification.description,
            "paramStructure": "by-name",
            "params": [
                {
                    "name": "subscription",
                    "required": True,
                    "description": f"The id {notification.subscribed_by} answered.",
                    "schema": {"type": "string"},
                },
                {"name": "result", "required": True, "schema": self._schema(notification.result)},
            ],
            "servers": [self._websocket_server()],
            "x-transport": "websocket",
            "x-notification": "server-to-client",
            "x-subscription": {
                "subscribe": notification.subscribed_by,
                "unsubscribe": notification.subscribed_by.replace("subscribe", "unsubscribe"),
            },
        }

    @staticmethod
    def _error(code: int) -> dict[str, Any]:
        error: dict[str, Any] = {"code": code, "message": ERROR_MESSAGES[code]}
        if code in ERROR_DATA:
            error["data"] = ERROR_DATA[code]
        return error

    def _example(self, method: RpcMethod) -> dict[str, Any]:
        assert method.example is not None
        example = method.example
        return {
            "name": example.name,
            "params": [{"name": name, "value": value} for name, value in example.params.items()],
            "result": {
                "name": method.result_name,
                "value": method.dump_result(example.result, example.params),
            },
        }

    def build(self) -> dict[str, Any]:
        methods = [self.method(m) for m in self.registry.methods.values()]
        methods += [self.notification(n) for n in self.registry.notifications.values()]
        return {
            "openrpc": OPENRPC_VERSION,
            "info": {"title": self.title, "version": __version__, "description": self.description},
            # An absolute URL: the meta-schema says ``format: uri``, which a path is not.
            "servers": [{"name": "this server", "url": self.server_url}],
            "methods": methods,
            "components": {"schemas": self.spec.to_dict()["components"]["schemas"]},
        }


def build_document(registry: MethodRegistry, *, server_url: str) -> dict[str, Any]:
    """The OpenRPC document describing every method in ``registry``, served at
    ``server_url`` (absolute: ``Settings.rpc_url()``)."""
    return OpenRpcBuilder(
        registry,
        server_url=server_url,
        title="Purchase fulfillment JSON-RPC API",
        description=(
            "JSON-RPC 2.0 over HTTP POST /rpc, and over a WebSocket on GET /rpc (text "
            "frames; the same methods, plus subscriptions). Authenticate with "
            "'Authorization: Bearer <token>' (on a WebSocket, or with rpc.authenticate as "
            "its first call). Params go by name or by position (in the order listed). "
            "Batches are answered item by item; notifications are never answered. Methods "
            "marked x-notification are sent by the server to a subscription, never called."
        ),
    ).build()
