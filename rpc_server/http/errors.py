"""Every refusal at the HTTP level as a JSON-RPC error object: 400, 403, 404, 405, 415, 500.

Where it sits: an application middleware just inside the request-id one, around every
route (``/rpc``, the webhook, health, docs) and aiohttp's own refusals raised as
``web.HTTPException`` (404 no such path, 405 wrong verb, 403 a CORS preflight refused).
Each becomes ``{"jsonrpc": "2.0", "error": {...}, "id": null}`` with the same status
and the headers that status needs (``Allow`` for 405), as ``application/json``.

The error's ``data`` is our own sentence for the status, never text taken from the
request: aiohttp's messages quote what they refused (a path, an Origin, a header line).
A handler that raises anything else answers 500 with -32603 and an ``error_id`` that the
log line carries, like an internal error inside a call; a client that went away
(``ConnectionError``) is left to aiohttp.

What aiohttp answers before any application code runs (a request line, header or
chunk its parser rejects) cannot be changed through its public API: see the README,
"HTTP".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from rpc_server.http.request_id import current_request_id
from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.errors import INTERNAL_ERROR, INVALID_REQUEST, SERVICE_UNAVAILABLE

logger = logging.getLogger("rpc_server.http.errors")

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"

# What each status says. Statuses not listed get their standard phrase.
_EXPLANATIONS: Final[Mapping[int, str]] = {
    400: "The HTTP request is malformed.",
    403: "Forbidden: this origin, method or header is not allowed here (CORS).",
    404: "Not found: the JSON-RPC endpoint is POST /rpc.",
    405: "Method not allowed: see the Allow header.",
    413: "The body is too large.",
    415: "Unsupported Content-Encoding: send the body as it is, or with gzip or deflate.",
}
# Headers of an aiohttp refusal worth keeping on ours (the rest describe its text body).
_KEPT_HEADERS: Final = (hdrs.ALLOW, hdrs.ACCEPT_ENCODING, hdrs.RETRY_AFTER)


class RequestRefused(Exception):
    """Raised while reading a request: answer ``status`` with this JSON-RPC error.

    ``data`` must be our own words, never bytes of the request.
    """

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.data = data
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: int,
    message: str,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON-RPC error object (``id`` null) as an HTTP answer with ``status``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return web.Response(
        body=json_codec.dumps({"jsonrpc": "2.0", "error": error, "id": None}),
        status=status,
        headers={**(headers or {}), hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE},
    )


def code_for_status(status: int) -> tuple[int, str]:
    """The JSON-RPC code and message that stand for an HTTP refusal."""
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return SERVICE_UNAVAILABLE, "Service unavailable"
    if status >= 500:
        return INTERNAL_ERROR, "Internal error"
    return INVALID_REQUEST, "Invalid Request"


def refusal(exc: web.HTTPException) -> web.Response:
    """aiohttp's refusal, with its status and needed headers, as a JSON-RPC error."""
    code, message = code_for_status(exc.status)
    explanation = _EXPLANATIONS.get(exc.status, f"{HTTPStatus(exc.status).phrase}.")
    headers = {str(name): exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
    return error_response(exc.status, code, message, explanation, headers)


def _route_of(request: web.Request) -> str:
    """The route's own path pattern (never the path the client sent)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise  # a redirect, or already one of ours
        return refusal(exc)
    except RequestRefused as exc:
        return error_response(exc.status, exc.code, exc.message, exc.data, exc.headers)
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:
        error_id = uuid.uuid4().hex
        logger.exception(
            "internal error %s in %s %s (request %s)",
            error_id,
            request.method,
            _route_of(request),
            current_request_id.get(),
        )
        return error_response(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            INTERNAL_ERROR,
            "Internal error",
            {"error_id": error_id},
        )
