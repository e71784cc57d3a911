"""The explicit method registry: each JSON-RPC method with its params, result and errors.

An ``RpcMethod`` binds a name to a thin handler, the Marshmallow schema of its params
(whose field order is the positional order), the schema of its result, whether it needs
a token, and the application errors it may return. ``MethodRegistry.dispatch_table``
turns the registry into the ``{name: function}`` dict the envelope looks methods up in
and calls through jsonrpcserver; each function loads params, authenticates, calls the
handler, dumps the result, and maps exceptions to JSON-RPC errors. Nothing reaches
jsonrpcserver's global registry.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonrpcserver import InvalidParams, Success
from jsonrpcserver.result import Result
from marshmallow import Schema, ValidationError

from rpc_server.domain.errors import PaymentNotVerified, Unauthenticated, WebSocketOnly
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.errors import error_result, timed_out
from schemas.dumping import Dumper, compile_dumper
from schemas.loading import Loader, compile_loader

Handler = Callable[..., Awaitable[Any]]
# Told, before a batch runs, the loaded params of one of its calls to this method: a
# chance to say what the call will read (``RpcMethod.read_ahead``).
ReadAhead = Callable[[RpcContext, Mapping[str, Any]], None]


def _dumper(schema: Schema | None) -> Dumper | None:
    return None if schema is None else compile_dumper(schema)


@dataclass(frozen=True)
class Example:
    """One example call for the OpenRPC document: params by name, and the value the
    handler would return (dumped through the method's own result schema)."""

    name: str
    params: dict[str, Any]
    result: Any


@dataclass(frozen=True)
class RpcMethod:
    """One JSON-RPC method.

    ``handler(ctx, actor, **params)`` receives the loaded params; ``actor`` is the caller
    (never None when ``auth`` is true). ``errors`` lists the application error codes
    the method can return besides the standard ones.
    """

    name: str
    handler: Handler
    params: type[Schema]
    # None: the handler returns JSON as it is (then ``result_json_schema`` describes it).
    result: Schema | None
    auth: bool = True
    errors: tuple[int, ...] = ()
    result_name: str = "result"
    result_json_schema: dict[str, Any] | None = None
    example: Example | None = None
    # A method that answered another shape before it took params keeps answering that
    # shape to a call made without any (registration.list's bare array): its schema.
    result_without_params: Schema | None = None
    # "websocket": offered over a WebSocket connection to /rpc only (rpc_server.live).
    transport: str = "any"
    # In a batch, called with each valid call's params before any call runs, so that
    # what the calls will read can be read together (``rpc_server.db.coalescing``).
    read_ahead: ReadAhead | None = None
    summary: str = field(init=False)
    description: str = field(init=False)
    # One params schema per method, built once: Marshmallow schemas are reusable, and
    # building one costs more than loading a call's params with it.
    params_schema: Schema = field(init=False, repr=False)
    # Its loader, compiled once from it (schemas/loading.py): valid params without
    # Schema.load, anything else through it.
    params_loader: Loader = field(init=False, repr=False, compare=False)
    # The result schemas' dumpers, compiled once from them (schemas/dumping.py): equal to
    # their ``dump`` without walking their fields on every call.
    result_dumper: Dumper | None = field(init=False, repr=False, compare=False)
    result_without_params_dumper: Dumper | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        doc = inspect.cleandoc(self.handler.__doc__ or "")
        summary, _, description = doc.partition("\n")
        object.__setattr__(self, "summary", summary or self.name)
        object.__setattr__(self, "description", description.strip())
        object.__setattr__(self, "params_schema", self.params())
        object.__setattr__(self, "params_loader", compile_loader(self.params_schema))
        object.__setattr__(self, "result_dumper", _dumper(self.result))
        object.__setattr__(
            self, "result_without_params_dumper", _dumper(self.result_without_params)
        )

    def dump_result(self, value: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Dump ``value``, the handler's answer to a call with these (loaded) ``params``
        (None: dump it with ``result``, whatever the params)."""
        dump = self.result_dumper
        if self.result_without_params_dumper is not None and params is not None and not params:
            dump = self.result_without_params_dumper
        return value if dump is None else dump(value)

    def load_params(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Validate params given by position or by name; return them by name.

        Raises marshmallow.ValidationError with per-field messages.
        """
        schema = self.params_schema
        if not args and not kwargs and not schema.load_fields:
            return {}  # a method without params, called without any: nothing to check
        if args:
            names = list(schema.load_fields)
            if len(args) > len(names):
                raise ValidationError(
                    {
                        "params": [
                            f"Expected at most {len(names)} positional params "
                            f"({', '.join(names) or 'none'}), got {len(args)}."
                        ]
                    }
                )
            kwargs = dict(zip(names, args, strict=False))
        return self.params_loader(kwargs)

    def announce(self, ctx: RpcContext, params: Any) -> None:
        """Before a batch runs, hand a call's params (as sent) to ``read_ahead``, loaded,
        if they are valid; invalid params are the call's own -32602 when it runs."""
        if self.read_ahead is None:
            return
        # As jsonrpcserver passes them to the method: an array by position, an object
        # by name.
        args: Sequence[Any] = params if isinstance(params, list) else ()
        kwargs: Mapping[str, Any] = params if isinstance(params, dict) else {}
        try:
            self.read_ahead(ctx, self.load_params(args, kwargs))
        except Exception:
            # A hint only: invalid params (ValidationError), or anything else, are the
            # call's own to answer when it runs; the batch goes on without the hint.
            return

    async def __call__(self, ctx: RpcContext, /, *args: Any, **kwargs: Any) -> Result:
        # ctx is positional-only, so a client param named "ctx" is just an unknown field.
        batch = ctx.batch_deadline
        if batch is not None:
            # A batch item: its lane's timer cuts it (``rpc_server.jsonrpc.envelope.answer``).
            if batch.passed():
                return batch.timed_out()  # not started in time: not started at all
            try:
                return await self._call(ctx, args, kwargs)
            except Exception as exc:  # a TimeoutError here is one of something inside
                return self._failed(ctx, exc)
        # A single call: the app's one timer cuts it (rpc_server.jsonrpc.call_timer).
        watch = ctx.call_timer.start(ctx.call_timeout)
        try:
            result = await self._call(ctx, args, kwargs)
        except asyncio.CancelledError:
            if watch.cut():  # the timer's, not a shutdown's or anybody else's
                return timed_out(ctx.call_timeout)
            raise
        except BaseException as exc:
            watch.end()
            if not isinstance(exc, Exception):
                raise
            return self._failed(ctx, exc)  # a TimeoutError too: one of something inside
        watch.end()
        return result

    def _failed(self, ctx: RpcContext, exc: Exception) -> Result:
        if isinstance(exc, PaymentNotVerified) and ctx.metrics is not None:
            ctx.metrics.observe_payment_refused("proof", exc.reason)
        return error_result(exc, method=self.name)

    async def _call(
        self, ctx: RpcContext, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Result:
        if self.transport == "websocket" and ctx.live is None:
            raise WebSocketOnly(self.name)  # whatever the params and the token
        actor = await ctx.authenticate()
        if self.auth and actor is None:
            raise Unauthenticated()
        try:
            params = self.load_params(args, kwargs)
        except ValidationError as exc:
            return InvalidParams(exc.messages)
        value = await self.handler(ctx, actor, **params)
        return Success(self.dump_result(value, params))


@dataclass(frozen=True)
class ServerNotification:
    """A notification the server sends (over a WebSocket) to a subscription: described
    in the OpenRPC document, never dispatched. ``params`` is ``{"subscription": id,
    "result": <result, dumped>}``."""

    name: str
    summary: str
    description: str
    result: Schema
    # The method whose answer names the subscription.
    subscribed_by: str


class MethodRegistry:
    def __init__(
        self,
        methods: Iterable[RpcMethod],
        notifications: Iterable[ServerNotification] = (),
    ):
        self.notifications = {n.name: n for n in notifications}
        self.methods: dict[str, RpcMethod] = {}
        for method in methods:
            if method.name in self.methods:
                raise ValueError(f"method {method.name} registered twice")
            self.methods[method.name] = method
        self._table: dict[str, Callable[..., Awaitable[Result]]] = dict(self.methods)
        # The methods whose calls can say ahead what they will read.
        self.reading_ahead = {n: m for n, m in self.methods.items() if m.read_ahead is not None}

    def dispatch_table(self) -> dict[str, Callable[..., Awaitable[Result]]]:
        """The ``{name: function}`` dict the envelope dispatches over (built once)."""
        return self._table
