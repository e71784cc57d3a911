"""The access log: one line per HTTP request, written by aiohttp after each answer.

The line is the one aiohttp's own access logger writes with the format
``%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-ID}o``::

    127.0.0.1 "POST /rpc HTTP/1.1" 200 87 0.000912 "curl/8.5.0" request_id=3f0c…

and it goes through the ``aiohttp.access`` logger like aiohttp's. It is written by hand
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
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from rpc_server.request_id import HEADER as REQUEST_ID_HEADER

# The same line as ``FORMAT`` produces with aiohttp's AccessLogger, kept for reference
# and for the test that compares both.
FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" request_id=%{X-Request-ID}o'
LOGGER = access_logger


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook, writing ``FORMAT``'s line without interpreting it."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6f "%s" request_id=%s',
            request.remote or "-",
            request.method,
            request.raw_path,
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get("User-Agent", "-"),
            response.headers.get(REQUEST_ID_HEADER, "-"),
        )
