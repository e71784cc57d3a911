"""The hand-written access-log line is the one aiohttp's own logger writes for FORMAT."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger as AiohttpAccessLogger

from rpc_server.access_log import FORMAT, AccessLogger


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize(
    ("path", "headers", "status", "body"),
    [
        ("/rpc", {"User-Agent": "curl/8.5.0"}, 200, b'{"jsonrpc":"2.0","result":1,"id":1}'),
        ("/rpc?x=1&y=%20", {}, 413, b"{}"),  # no User-Agent; a query string
        ("/caf%C3%A9", {"User-Agent": 'quote " inside'}, 404, b""),
    ],
)
def test_the_line_is_aiohttps_for_the_same_format(
    path: str, headers: dict[str, str], status: int, body: bytes
) -> None:
    logger = logging.getLogger("test.access_log_line")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    try:
        transport: Any = type("Transport", (), {"get_extra_info": lambda self, name: None})()
        request = make_mocked_request("POST", path, headers=headers, transport=transport)
        response = web.Response(status=status, body=body, headers={"X-Request-ID": "abc-1"})
        response._body_length = len(body)  # what aiohttp sets once the body is written
        AccessLogger(logger, FORMAT).log(request, response, 0.001234)
        AiohttpAccessLogger(logger, FORMAT).log(request, response, 0.001234)
    finally:
        logger.removeHandler(handler)
    ours, aiohttps = handler.lines
    assert ours == aiohttps
    assert ours.endswith("request_id=abc-1")


def test_nothing_is_formatted_when_info_is_off() -> None:
    logger = logging.getLogger("test.access_log_off")
    logger.setLevel(logging.WARNING)
    assert AccessLogger(logger, FORMAT).enabled is False
