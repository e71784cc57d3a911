"""The access log: one line per HTTP request, written by aiohttp after each answer.

In text (``RPC_SERVER_LOG_FORMAT=text``, the default) the line is the one aiohttp's own
access logger writes with the format
``%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-ID}o``::

    127.0.0.1 "POST /rpc HTTP/1.1" 200 87 0.000912 "curl/8.5.0" request_id=3f0c…

except that what the client chose (the path, the User-Agent, the address a proxy
reports) is escaped (``rpc_server.log_output.escape``): a ``"``, a backslash, a newline
or any other control character becomes ``\\xHH``, so a client can neither end the
line nor forge a field. In JSON (``RPC_SERVER_LOG_FORMAT=json``, ``JSON_FORMAT`` here)
the fields go out as fields of the line's JSON object (``remote``, ``method``, ``path``,
``protocol``, ``status``, ``bytes``, ``duration``, ``user_agent``; ``request_id`` as on
every line).

An answer that could not be delivered because the client had gone (its connection
closed while the call ran) is logged with status 499, nginx's "client closed request",
rather than the status of an answer nobody received.

It goes through the ``aiohttp.access`` logger like aiohttp's. It is written by hand
because aiohttp's logger, which interprets its format string for every request and
builds the request's URL object to print its path, cost the server more CPU per request
than the whole JSON-RPC dispatch of a cheap call (measured in
``tests/benchmarks/profile.md``). Here the request line comes from the raw path as the
client sent it, and nothing is computed unless the logger is enabled.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

from rpc_server.http.request_id import HEADER as REQUEST_ID_HEADER
from rpc_server.http.request_id import current_request_id
from rpc_server.log_output import escape, plain_handler

# The same line as ``FORMAT`` produces with aiohttp's AccessLogger (for printable
# values without quotes), kept for reference and for the test that compares both.
FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-ID}o'
# The text line (its arguments: FORMAT's fields in order).
_TEXT_LINE = '%s "%s %s HTTP/%d.%d" %d %d %.6f "%s" request_id=%s'
# ``AppRunner(access_log_format=JSON_FORMAT)``: the fields as JSON fields.
JSON_FORMAT = "json"
LOGGER = access_logger
CLIENT_CLOSED_REQUEST = 499
# The trace of a request's span (set by ``handle_rpc`` when tracing is on).
TRACE_ID = RequestKey("trace_id", str)


def log_format_for(setting: str) -> str:
    """The ``access_log_format`` for ``RPC_SERVER_LOG_FORMAT``."""
    return JSON_FORMAT if setting == "json" else FORMAT


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook, writing ``FORMAT``'s line without interpreting it."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.json = log_format == JSON_FORMAT

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        version = request.version
        # With tracing on, the line joins its request's trace (the span has ended by
        # now, so the log filter cannot find it): only then, so lines stay as they were.
        trace_id = request.get(TRACE_ID)
        extra = None if trace_id is None else {"trace_id": trace_id}
        status = response.status
        # 101: a WebSocket, logged when it ends; its upgrade was answered at its start.
        if status < 400 and status != 101:
            transport = request.transport
            if transport is None or transport.is_closing():
                status = CLIENT_CLOSED_REQUEST  # the client left before the answer
        if self.json:
            self._log_json(request, response, status, time, extra or {})
            return
        args = (
            escape(request.remote or "-"),
            request.method,
            escape(request.raw_path),
            version.major,
            version.minor,
            status,
            response.body_length,
            time,
            escape(request.headers.get("User-Agent", "-")),
            response.headers.get(REQUEST_ID_HEADER, "-"),
        )
        if extra is None and (handler := plain_handler(self.logger)) is not None:
            # Logging is as ``configure_logging`` set it up: the same line, no record.
            handler.write_plain(self.logger.name, _TEXT_LINE % args)
            return
        self._info(_TEXT_LINE, args, extra)

    def _info(
        self, message: str, args: tuple[object, ...], extra: dict[str, object] | None
    ) -> None:
        """``logger.info(message, *args, extra=extra)`` (``enabled`` was checked by
        aiohttp), without looking up the caller's file and line, which no line shows:
        that look-up walks the stack for every request."""
        logger = self.logger
        record = logger.makeRecord(
            logger.name, logging.INFO, "", 0, message, args, None, extra=extra
        )
        logger.handle(record)

    def _log_json(
        self,
        request: BaseRequest,
        response: StreamResponse,
        status: int,
        time: float,
        extra: dict[str, str],
    ) -> None:
        version = request.version
        # Every line's request_id comes from the context; the answer's id is that of
        # the request (the context was reset when the handler returned).
        reset = current_request_id.set(response.headers.get(REQUEST_ID_HEADER, "-"))
        try:
            self._info(
                "%s %s %d",
                (request.method, request.raw_path, status),
                {
                    "remote": request.remote,
                    "method": request.method,
                    "path": request.raw_path,
                    "protocol": f"HTTP/{version.major}.{version.minor}",
                    "status": status,
                    "bytes": response.body_length,
                    "duration": round(time, 6),
                    "user_agent": request.headers.get("User-Agent"),
                    **extra,
                },
            )
        finally:
            current_request_id.reset(reset)
