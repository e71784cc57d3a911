"""The explicit method registry: each JSON-RPC method with its params, result and errors.

An ``RpcMethod`` binds a name to a thin handler, the Marshmallow schema of its params
(whose field order is the positional order), the schema of its result, whether it needs
a token, and the application errors it may return. ``MethodRegistry.dispatch_table``
turns the registry into the ``{name: function}`` dict that jsonrpcserver dispatches
over; each function loads params, authenticates, calls the handler, dumps the result,
and maps exceptions to JSON-RPC errors. Nothing reaches jsonrpcserver's global registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonrpcserver import InvalidParams, Success
from jsonrpcserver.result import Result
from marshmallow import Schema, ValidationError

from rpc_server.context import RpcContext
from rpc_server.domain.errors import Unauthenticated
from rpc_server.errors import error_result, timed_out

Handler = Callable[..., Awaitable[Any]]


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
    result: Schema
    auth: bool = True
    errors: tuple[int, ...] = ()
    summary: str = field(init=False)

    def __post_init__(self) -> None:
        doc = (self.handler.__doc__ or "").strip()
        object.__setattr__(self, "summary", doc.splitlines()[0] if doc else self.name)

    def load_params(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Validate params given by position or by name; return them by name.

        Raises marshmallow.ValidationError with per-field messages.
        """
        schema = self.params()
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
        loaded: dict[str, Any] = schema.load(kwargs)
        return loaded

    async def __call__(self, ctx: RpcContext, /, *args: Any, **kwargs: Any) -> Result:
        # ctx is positional-only, so a client param named "ctx" is just an unknown field.
        deadline = asyncio.timeout(ctx.call_timeout)
        try:
            async with deadline:
                return await self._call(ctx, args, kwargs)
        except TimeoutError as exc:
            if deadline.expired():  # not a timeout of something inside
                return timed_out(ctx.call_timeout)
            return error_result(exc, method=self.name)
        except Exception as exc:
            return error_result(exc, method=self.name)

    async def _call(
        self, ctx: RpcContext, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Result:
        actor = await ctx.authenticate()
        if self.auth and actor is None:
            raise Unauthenticated()
        try:
            params = self.load_params(args, kwargs)
        except ValidationError as exc:
            return InvalidParams(exc.messages)
        value = await self.handler(ctx, actor, **params)
        return Success(self.result.dump(value))


class MethodRegistry:
    def __init__(self, methods: Iterable[RpcMethod]):
        self.methods: dict[str, RpcMethod] = {}
        for method in methods:
            if method.name in self.methods:
                raise ValueError(f"method {method.name} registered twice")
            self.methods[method.name] = method

    def dispatch_table(self) -> dict[str, Callable[..., Awaitable[Result]]]:
        """The ``methods`` dict to hand to jsonrpcserver's dispatch."""
        return dict(self.methods)
