"""Exceptions to JSON-RPC errors: one table, looked up along the exception's class hierarchy.

Application errors use codes outside the range JSON-RPC reserves (-32768..-32000) and
mirror HTTP: 401, 402, 404, 409. ``-32000`` "Service unavailable" is the one
implementation-defined server error (the database cannot be reached). Anything not in
the table is an internal error: logged with an error id; the client gets only the id.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from jsonrpcserver import Error
from jsonrpcserver.result import Result

from rpc_server.db.errors import database_unavailable
from rpc_server.domain.errors import (
    Conflict,
    DomainError,
    InvalidArgument,
    NotFound,
    PaymentNotVerified,
    Unauthenticated,
    Unavailable,
    WebSocketOnly,
)
from rpc_server.http.request_id import current_request_id

logger = logging.getLogger("rpc_server.jsonrpc.errors")

# Standard JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server error.
SERVICE_UNAVAILABLE = -32000
TIMED_OUT = -32001
# Application errors, mirroring HTTP.
UNAUTHENTICATED = 401
PAYMENT_NOT_VERIFIED = 402
NOT_FOUND = 404
CONFLICT = 409
RATE_LIMITED = 429

# What each code means, as the OpenRPC document lists it.
ERROR_MESSAGES: dict[int, str] = {
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    SERVICE_UNAVAILABLE: "Service unavailable",
    TIMED_OUT: "Timed out",
    UNAUTHENTICATED: "Unauthenticated",
    PAYMENT_NOT_VERIFIED: "Payment not verified",
    NOT_FOUND: "Not found",
    CONFLICT: "Conflict",
    RATE_LIMITED: "Too many requests",
}
# Errors any method can return, whatever it does.
STANDARD_METHOD_ERRORS = (
    INVALID_PARAMS, RATE_LIMITED, SERVICE_UNAVAILABLE, TIMED_OUT, INTERNAL_ERROR,
)  # fmt: skip

ERROR_CODES: dict[type[BaseException], int] = {
    Unauthenticated: UNAUTHENTICATED,
    InvalidArgument: INVALID_PARAMS,
    Unavailable: SERVICE_UNAVAILABLE,
    WebSocketOnly: METHOD_NOT_FOUND,
    PaymentNotVerified: PAYMENT_NOT_VERIFIED,
    NotFound: NOT_FOUND,
    Conflict: CONFLICT,
}


def code_for(exc: BaseException) -> int | None:
    """Return the JSON-RPC code of a domain error, walking up its class hierarchy."""
    for klass in type(exc).__mro__:
        if klass in ERROR_CODES:
            return ERROR_CODES[klass]
    return None


def timed_out(seconds: float) -> Result:
    """The answer of a call that ran past the per-call timeout (its work is rolled back)."""
    return Error(TIMED_OUT, "Timed out", {"timeout_seconds": seconds})


def error_result(exc: Exception, *, method: str) -> Result:
    """Turn an exception raised by a method into a JSON-RPC error result."""
    if isinstance(exc, DomainError) and (code := code_for(exc)) is not None:
        return Error(code, exc.message, *([exc.data] if exc.data is not None else []))
    if database_unavailable(exc):
        logger.warning("database unavailable in %s: %s", method, type(exc).__name__)
        return Error(SERVICE_UNAVAILABLE, "Service unavailable: try again later")
    error_id = uuid.uuid4().hex
    logger.exception(
        "internal error %s in %s (request %s)", error_id, method, current_request_id.get()
    )
    data: dict[str, Any] = {"error_id": error_id}
    return Error(INTERNAL_ERROR, "Internal error", data)
