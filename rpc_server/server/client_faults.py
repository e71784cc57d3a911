"""A client's faults are not the server's: one INFO line each, never an ERROR or a 500.

Where it sits: ``read_body`` (``rpc_server.app``) reads every request body inside
``receiving_body``, and ``start_serving`` (``rpc_server.server.serving``) gives aiohttp
``server_logger()`` as the logger of its HTTP protocol.

- A body that stops arriving: at the request's read deadline (``RPC_SERVER_READ_TIMEOUT``,
  kept by ``rpc_server.server.connection_limits`` when served by ``serve``; a timeout of its own
  otherwise) the answer is HTTP 408 with a JSON-RPC error, and the connection closes.
- A client that goes away mid-body: one INFO line, and the access log shows 499 (nginx's
  "client closed request"), not 500. One that goes away while its call runs is logged
  by the access log the same way (``rpc_server.http.access_log``).
- A body that breaks its own framing or encoding (a bad chunk, a Content-Encoding it
  does not follow): HTTP 400 with a JSON-RPC error.
- Malformed HTTP (a bad request line or header), which aiohttp answers 400 itself and
  logs as an ERROR with a traceback: ``ClientFaultFilter`` turns that record into
  one INFO line without the traceback (a record's filter may change it; documented
  logging behaviour). Errors of the server's own stay ERRORs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.envelope import invalid_request
from rpc_server.server.connection_limits import connection_of, request_timeout_answer

log = logging.getLogger("rpc_server.connections")

SERVER_LOGGER_NAME = "rpc_server.http"
JSON = "application/json"


class RequestTimedOut(web.HTTPRequestTimeout):
    """408: the request's body did not arrive within the read timeout."""

    def __init__(self, read_timeout: float) -> None:
        super().__init__(
            text=json_codec.dumps(request_timeout_answer(read_timeout)).decode(),
            content_type=JSON,
        )
        self.force_close()


class ClientClosedRequest(web.HTTPClientError):
    """499 (nginx's "client closed request"): the client went away before it was answered.

    Never reaches the client; it is what the access log shows instead of a 500."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__(
            reason="Client Closed Request",
            text=json_codec.dumps(invalid_request("The client closed the request.")).decode(),
            content_type=JSON,
        )
        self.force_close()


class MalformedBody(web.HTTPBadRequest):
    """400: the body's framing or encoding is broken (a bad chunk, a bad Content-Encoding)."""

    def __init__(self) -> None:
        super().__init__(
            text=json_codec.dumps(
                invalid_request("The request body is malformed (its framing or encoding).")
            ).decode(),
            content_type=JSON,
        )
        self.force_close()


@asynccontextmanager
async def receiving_body(request: web.Request, read_timeout: float) -> AsyncIterator[None]:
    """Read a request's body inside this; raises RequestTimedOut, ClientClosedRequest or
    MalformedBody (HTTP answers, each logged once at INFO) for the client's faults."""
    connection = connection_of(request)
    try:
        if connection is None:  # no guarded connection keeps the deadline: keep one here
            async with asyncio.timeout(read_timeout):
                yield
        else:
            yield
            connection.body_received()
    except TimeoutError:
        log.info(
            "request from %s: its body did not arrive within %gs (%s)",
            request.remote,
            read_timeout,
            _progress(request),
        )
        raise RequestTimedOut(read_timeout) from None
    except ConnectionError:
        if connection is not None and connection.timed_out:  # the guard closed it; logged
            raise RequestTimedOut(read_timeout) from None
        log.info("client %s went away mid-request (%s)", request.remote, _progress(request))
        raise ClientClosedRequest() from None
    except web.RequestPayloadError as exc:
        log.info("request from %s: malformed body: %s", request.remote, _first_line(exc))
        raise MalformedBody() from None


def _progress(request: web.Request) -> str:
    received = request.content.total_bytes
    expected = request.content_length
    if expected is None:
        return f"{received} bytes of its body came"
    return f"{received} of {expected} body bytes came"


def _first_line(exc: BaseException) -> str:
    """The gist of a parser's message, without the request bytes it quotes below it."""
    message = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    # aiohttp's text reads "400, message:" then the reason on the next line.
    lines = [line for line in lines if not line.endswith("message:")]
    return lines[0].rstrip(":") if lines else type(exc).__name__


class ClientFaultFilter(logging.Filter):
    """Turns aiohttp's ERROR about malformed HTTP (a client's fault, answered 400) into
    one INFO line without the traceback; lets everything else by, the server's own errors
    (a handler that raised: 500) included."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
        record.msg = "malformed HTTP from %s: %s"
        record.args = (remote, _first_line(exc))
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.INFO:
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(record.levelno)


def server_logger() -> logging.Logger:
    """The logger for aiohttp's HTTP protocol (``AppRunner(logger=…)``), with the filter."""
    logger = logging.getLogger(SERVER_LOGGER_NAME)
    if not any(isinstance(f, ClientFaultFilter) for f in logger.filters):
        logger.addFilter(ClientFaultFilter())
    return logger
