"""The JSON-RPC 2.0 envelope: parse once, check each request object, dispatch, assemble.

jsonrpcserver 5.0.9 validates a whole batch against one schema, so one bad item turns
a batch into a single "Invalid Request". The specification answers item by item, so
this module checks every request object on its own and hands only the valid ones to
jsonrpcserver, one at a time, concurrently. Each item gets its own unit of work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jsonrpcserver import async_dispatch_to_serializable

from rpc_server import json_codec
from rpc_server.context import RpcContext
from rpc_server.errors import INVALID_REQUEST, PARSE_ERROR
from rpc_server.json_codec import ParseError
from rpc_server.registry import MethodRegistry

JsonObject = dict[str, Any]

__all__ = ["ParseError", "answer", "parse"]


def parse(body: bytes, *, max_depth: int = 64) -> Any:
    """Parse a request body; raises ParseError with a message fit for the client."""
    return json_codec.loads(body, max_depth=max_depth)


def error_object(code: int, message: str, data: Any = None, id: Any = None) -> JsonObject:
    error: JsonObject = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": id}


def parse_error(reason: str) -> JsonObject:
    return error_object(PARSE_ERROR, "Parse error", reason)


def invalid_request(reason: str) -> JsonObject:
    return error_object(INVALID_REQUEST, "Invalid Request", reason)


def problem_with(item: Any) -> str | None:
    """Return why ``item`` is not a valid JSON-RPC 2.0 request object, or None if it is."""
    if not isinstance(item, dict):
        return "A request must be a JSON object."
    if item.get("jsonrpc") != "2.0":
        return 'The "jsonrpc" member must be exactly "2.0".'
    if not isinstance(item.get("method"), str):
        return 'The "method" member must be a string.'
    if "params" in item and not isinstance(item["params"], (list, dict)):
        return 'The "params" member must be an array or an object.'
    if "id" in item:
        id_ = item["id"]
        if isinstance(id_, bool) or not isinstance(id_, (str, int, float, type(None))):
            return 'The "id" member must be a string, a number or null.'
    extra = set(item) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"Unknown members: {', '.join(sorted(extra))}."
    return None


async def answer_one(item: Any, registry: MethodRegistry, ctx: RpcContext) -> JsonObject | None:
    """Answer one request object; None for a notification (never answered)."""
    problem = problem_with(item)
    if problem is not None:
        return invalid_request(problem)
    answer = await async_dispatch_to_serializable(
        item,
        methods=registry.dispatch_table(),
        context=ctx,
        # Already parsed and checked above: hand the object through untouched.
        deserializer=lambda parsed: parsed,
        validator=lambda parsed: parsed,
    )
    assert not isinstance(answer, list)  # one request object in, at most one answer out
    return answer


async def answer(
    payload: Any, registry: MethodRegistry, ctx: RpcContext, *, max_batch_length: int
) -> JsonObject | list[JsonObject] | None:
    """Answer a parsed body: one object, a list for a batch, None if nothing to answer."""
    if not isinstance(payload, list):
        return await answer_one(payload, registry, ctx)
    if not payload:
        return invalid_request("An empty batch is not a request.")
    if len(payload) > max_batch_length:
        return invalid_request(
            f"A batch may hold at most {max_batch_length} requests, got {len(payload)}."
        )
    answers = await asyncio.gather(*(answer_one(item, registry, ctx) for item in payload))
    collected = [a for a in answers if a is not None]
    return collected or None
