"""The JSON-RPC 2.0 envelope: parse once, check each request object, dispatch, assemble.

jsonrpcserver 5.0.9 validates a whole batch against one schema, so one bad item turns
a batch into a single "Invalid Request". The specification answers item by item, so
this module checks every request object on its own and hands only the valid ones to
jsonrpcserver, one at a time, several items concurrently. Each item gets its own unit
of work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from types import NoneType
from typing import Any

from jsonrpcserver.async_dispatcher import call
from jsonrpcserver.dispatcher import create_request, to_response
from jsonrpcserver.request import Request
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.result import Error, MethodNotFoundResult, Result
from jsonrpcserver.sentinels import NOID

from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.errors import (
    INVALID_REQUEST,
    PARSE_ERROR,
    RATE_LIMITED,
    TIMED_OUT,
    timed_out,
)
from rpc_server.jsonrpc.json_codec import ExactNumber, ParseError
from rpc_server.jsonrpc.rate_limit import RateLimits, cost_of
from rpc_server.jsonrpc.registry import MethodRegistry
from rpc_server.observability.labels import OK

JsonObject = dict[str, Any]
logger = logging.getLogger("rpc_server.jsonrpc.envelope")

__all__ = ["ParseError", "answer", "parse"]

# What an id may be once parsed: a number id whose text matters is an ExactNumber
# (``rpc_server.jsonrpc.json_codec``), written back exactly as the client sent it.
ID_TYPES = (str, int, float, ExactNumber, NoneType)
# How far past its own timeout a batch item may run (a fraction of the timeout): the
# room that lets a lane's calls share one timer (``answer``).
DEADLINE_SLACK = 0.01


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


# The members a request object may have.
_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})


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
        if isinstance(id_, bool) or not isinstance(id_, ID_TYPES):
            return 'The "id" member must be a string, a number or null.'
    if not _MEMBERS.issuperset(item):
        return f"Unknown members: {', '.join(sorted(set(item) - _MEMBERS))}."
    return None


async def answer_one(
    item: Any,
    registry: MethodRegistry,
    ctx: RpcContext,
    *,
    retry_after: float | None = None,
    problem: str | None,
) -> JsonObject | None:
    """Answer one request object; None for a notification (never answered).

    With ``retry_after`` set, the call is over its rate limit: it is not run. Each valid
    request object is one call for the metrics and traces (``ctx.metrics``, ``ctx.tracing``).
    ``problem``: what ``problem_with(item)`` returned (asked once per item, before the
    rate limits count the valid ones).
    """
    if problem is not None:
        if ctx.metrics is not None:
            ctx.metrics.observe_refusal("invalid_request")
        return invalid_request(problem)
    metrics, tracing = ctx.metrics, ctx.tracing
    if metrics is None and tracing is None:
        return (await _run_call(item, registry, ctx, retry_after))[0]
    started = time.perf_counter()
    if tracing is None:
        answer, code = await _run_call(item, registry, ctx, retry_after)
    else:
        with tracing.call_span(item["method"], item.get("id"), "id" in item) as span:
            try:
                answer, code = await _run_call(item, registry, ctx, retry_after)
            except asyncio.CancelledError:
                # In a batch, how its lane's timer cuts a call (``answer``): -32001.
                if ctx.batch_deadline is not None:
                    span.ended(TIMED_OUT)
                raise
            span.ended(code)
    if metrics is not None:
        metrics.observe_call(
            metrics.method_label(item["method"]),
            OK if code is None else str(code),
            time.perf_counter() - started,
        )
    return answer


async def _run_call(
    item: JsonObject, registry: MethodRegistry, ctx: RpcContext, retry_after: float | None
) -> tuple[JsonObject | None, int | None]:
    """Run one valid request object: its answer (None for a notification) and its error
    code (None when it succeeded)."""
    if retry_after is not None:
        error = error_object(
            RATE_LIMITED, "Too many requests", {"retry_after": retry_after}, item.get("id")
        )
        return (error if "id" in item else None), RATE_LIMITED
    # jsonrpcserver's own steps for one request object: make its Request, call the
    # method (which maps a JsonRpcError or any other exception to an error result), make
    # the response. Its outer layers (parse, schema-validate, gather) would only repeat
    # what this module has already done for the whole body. Its argument check is
    # skipped too: it binds ``inspect.signature(method)`` to the params, and every
    # ``RpcMethod`` takes ``(ctx, /, *args, **kwargs)`` and checks its params itself with
    # its schema, so that check could never fail; it cost more than the rest of the
    # dispatch of a cheap call (tests/benchmarks/profile.md).
    request = create_request(item)
    method = registry.dispatch_table().get(request.method)
    if method is None:
        result = Error(*MethodNotFoundResult(request.method))  # as its get_method answers
    else:
        result = await call(request, ctx, method)
    if request.id is NOID:
        # A notification: run, never answered. Its outcome is still counted, read from
        # the response it would have had (jsonrpcserver shows a result only so).
        if ctx.metrics is None and ctx.tracing is None:
            return None, None
        unanswered = Request(request.method, request.params, None)
        return None, _error_code(_response(unanswered, result))
    answer = _response(request, result)
    return answer, _error_code(answer)


def _response(request: Request, result: Result) -> JsonObject:
    """jsonrpcserver's response object to ``request`` with ``result``."""
    answer = to_serializable_one(to_response(request, result))
    assert isinstance(answer, dict)  # one response in, one response object out
    return answer


def _error_code(answer: JsonObject) -> int | None:
    error = answer.get("error")
    return None if error is None else int(error["code"])


async def _over_limit(
    items: list[Any], problems: list[str | None], ctx: RpcContext, limits: RateLimits | None
) -> list[float | None]:
    """For each item, None if it may run, else the seconds after which to retry.

    Every valid request object (``problems``: each item's ``problem_with``) is a call,
    counted at its cost (``rpc_server.jsonrpc.rate_limit``: the caller's user pays, or
    without a valid token the client address).
    """
    verdicts: list[float | None] = [None] * len(items)
    if limits is None:
        return verdicts
    valid = [i for i, problem in enumerate(problems) if problem is None]
    admitted = await limits.admit(ctx, [cost_of(items[i]) for i in valid])
    for index, verdict in zip(valid, admitted, strict=True):
        verdicts[index] = verdict
    if ctx.metrics is not None and (refused := len(admitted) - admitted.count(None)):
        ctx.metrics.observe_rate_limited(refused)
    return verdicts


async def answer(
    payload: Any,
    registry: MethodRegistry,
    ctx: RpcContext,
    *,
    max_batch_length: int,
    limiter: RateLimits | None = None,
    concurrency: int = 10,
) -> JsonObject | list[JsonObject] | None:
    """Answer a parsed body: one object, a list for a batch, None if nothing to answer.

    A batch's items run concurrently, at most ``concurrency`` at a time.
    """
    if not isinstance(payload, list):
        problem = problem_with(payload)
        [verdict] = await _over_limit([payload], [problem], ctx, limiter)
        return await answer_one(payload, registry, ctx, retry_after=verdict, problem=problem)
    metrics = ctx.metrics
    if not payload:
        if metrics is not None:
            metrics.observe_refusal("empty_batch")
        return invalid_request("An empty batch is not a request.")
    if len(payload) > max_batch_length:
        if metrics is not None:
            metrics.observe_refusal("batch_too_long")
        return invalid_request(
            f"A batch may hold at most {max_batch_length} requests, got {len(payload)}."
        )
    if metrics is not None:
        metrics.observe_batch(len(payload))
    problems = [problem_with(item) for item in payload]
    verdicts = await _over_limit(payload, problems, ctx, limiter)
    if reading_ahead := registry.reading_ahead:
        # The calls that will run say what they will read, so that it is read together
        # before they need it (``RpcMethod.read_ahead``).
        for item, problem, verdict in zip(payload, problems, verdicts, strict=True):
            if problem is None and verdict is None:
                method = reading_ahead.get(item["method"])
                if method is not None:
                    method.announce(ctx, item.get("params"))
    answers: list[JsonObject | None] = [None] * len(payload)
    pending = iter(range(len(payload)))
    loop = asyncio.get_running_loop()
    batch = ctx.batch_deadline
    batch_at = math.inf if batch is None else batch.at
    call_timeout = ctx.call_timeout
    slack = call_timeout * DEADLINE_SLACK

    async def lane() -> None:
        # Lanes share one iterator: each takes the next item when it is free.
        #
        # Each call runs until the sooner of its own timeout and the batch's deadline.
        # The lane keeps one timer for its calls rather than one each (an
        # ``asyncio.timeout`` entered and left per call was ~5 % of a batch item's time):
        # it is moved only when it would cut the next call too soon, and then to a
        # little later than that call needs (``DEADLINE_SLACK``), so that the calls
        # after it fit too. A call may thus run up to 1 % past its own timeout, never
        # past the batch's deadline. When the timer cuts a call, that call answers
        # -32001 (its unit of work rolls back, as it always did) and the lane goes on
        # with a new timer.
        index = -1
        started = 0.0
        while True:
            try:
                async with asyncio.timeout(None) as timer:
                    for index in pending:
                        due = min(loop.time() + call_timeout, batch_at)
                        when = timer.when()
                        if when is None or when < due:
                            timer.reschedule(min(due + slack, batch_at))
                        started = time.perf_counter()
                        answers[index] = await answer_one(
                            payload[index],
                            registry,
                            ctx,
                            retry_after=verdicts[index],
                            problem=problems[index],
                        )
                return
            except TimeoutError:
                if not timer.expired():
                    raise
                answers[index] = _cut(payload[index], ctx, started)

    # Items run concurrently in at most ``concurrency`` lanes, not one task each: more
    # items in flight than pooled connections would only queue for the pool (or open
    # and close overflow connections), and items that never wait (rpc.discover, errors)
    # run straight through the first lane, which is this coroutine itself.
    others = [asyncio.create_task(lane()) for _ in range(min(concurrency, len(payload)) - 1)]
    try:
        await lane()
        await asyncio.gather(*others)
    finally:
        for task in others:
            task.cancel()
    collected = [a for a in answers if a is not None]
    return collected or None


def _cut(item: JsonObject, ctx: RpcContext, started: float) -> JsonObject | None:
    """The answer of a batch item its lane's timer cut (None for a notification): the
    batch's -32001 once the batch's deadline has passed, else the call's own."""
    batch = ctx.batch_deadline
    result = batch.timed_out() if batch and batch.passed() else timed_out(ctx.call_timeout)
    request = create_request(item)
    if ctx.metrics is not None:
        ctx.metrics.observe_call(
            ctx.metrics.method_label(request.method), str(TIMED_OUT), time.perf_counter() - started
        )
    return None if request.id is NOID else _response(request, result)
