"""The hand-written access-log line: aiohttp's own line for FORMAT where the client sent
plain text, escaped where it did not (no forged field, no extra line), JSON fields in
the JSON format, and 499 for an answer its client left before receiving."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger as AiohttpAccessLogger

from rpc_server.http.access_log import FORMAT, JSON_FORMAT, AccessLogger, log_format_for
from rpc_server.http.request_id import RequestIdFilter
from rpc_server.log_output import formatter


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record) if self.formatter else record.getMessage())


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, Lines]]:
    logger = logging.getLogger("test.access_log_line")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


class Transport:
    """Just enough of a transport for a mocked request: open, or closed by its client."""

    def __init__(self, closing: bool = False) -> None:
        self.closing = closing

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else None

    def is_closing(self) -> bool:
        return self.closing


def exchange(
    path: str,
    headers: dict[str, str],
    status: int = 200,
    body: bytes = b"{}",
    transport: Any = None,
) -> tuple[Any, web.Response]:
    request = make_mocked_request("POST", path, headers=headers, transport=transport or Transport())
    response = web.Response(status=status, body=body, headers={"X-Request-ID": "abc-1"})
    response._body_length = len(body)  # what aiohttp sets once the body is written
    return request, response


@pytest.mark.parametrize(
    ("path", "headers", "status", "body"),
    [
        ("/rpc", {"User-Agent": "curl/8.5.0"}, 200, b'{"jsonrpc":"2.0","result":1,"id":1}'),
        ("/rpc?x=1&y=%20", {}, 413, b"{}"),  # no User-Agent; a query string
        ("/caf%C3%A9", {"User-Agent": "Mozilla/5.0 (X11; Linux) café"}, 404, b""),
    ],
)
def test_a_plain_line_is_aiohttps_for_the_same_format(
    lines: tuple[logging.Logger, Lines],
    path: str,
    headers: dict[str, str],
    status: int,
    body: bytes,
) -> None:
    logger, handler = lines
    request, response = exchange(path, headers, status, body)
    AccessLogger(logger, FORMAT).log(request, response, 0.001234)
    AiohttpAccessLogger(logger, FORMAT).log(request, response, 0.001234)
    ours, aiohttps = handler.lines
    assert ours == aiohttps
    assert ours.endswith("request_id=abc-1")


FORGED = '-" 200 1 0.1 "x" request_id=forged\n127.0.0.1 "GET /admin HTTP/1.1" 200 5 0.1 "x'


@pytest.mark.parametrize(
    ("user_agent", "escaped"),
    [
        ('a" 200 5 "forged', "a\\x22 200 5 \\x22forged"),
        ("back\\slash", "back\\x5cslash"),
        (FORGED, FORGED.replace('"', "\\x22").replace("\n", "\\x0a")),
        ("tab\there\x1b[31mred\x7f", "tab\\x09here\\x1b[31mred\\x7f"),
        ("line\u2028sep\x85next", "line\\u2028sep\\x85next"),  # Unicode line breaks
    ],
)
def test_what_the_client_sent_is_escaped_so_no_field_or_line_can_be_forged(
    lines: tuple[logging.Logger, Lines], user_agent: str, escaped: str
) -> None:
    logger, handler = lines
    request, response = exchange('/rpc?q="\\', {"User-Agent": user_agent})
    AccessLogger(logger, FORMAT).log(request, response, 0.5)
    [line] = handler.lines
    assert line == (
        f'127.0.0.1 "POST /rpc?q=\\x22\\x5c HTTP/1.1" 200 2 0.500000 "{escaped}" request_id=abc-1'
    )
    assert line.count('"') == 4  # the two quoted fields, and nothing else
    assert len(line.splitlines()) == 1
    assert line.isprintable()


def test_an_answer_its_client_left_before_receiving_is_logged_499(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = lines
    for transport in (Transport(closing=True), Transport()):
        request, response = exchange("/rpc", {}, 200, transport=transport)
        AccessLogger(logger, FORMAT).log(request, response, 0.1)
    request, response = exchange("/rpc", {}, 408, transport=Transport(closing=True))
    AccessLogger(logger, FORMAT).log(request, response, 0.1)
    statuses = [line.split('" ')[1].split()[0] for line in handler.lines]
    assert statuses == ["499", "200", "408"]  # an error answer keeps its own status


def test_json_format_gives_the_fields_as_json_fields(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = lines
    handler.setFormatter(formatter("json"))
    handler.addFilter(RequestIdFilter())
    assert log_format_for("json") == JSON_FORMAT and log_format_for("text") == FORMAT
    request, response = exchange('/rpc?a="b"', {"User-Agent": 'evil"\n{"status": 200}'}, 201)
    AccessLogger(logger, JSON_FORMAT).log(request, response, 0.0012345)
    [line] = handler.lines
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["time"] and fields["level"] == "INFO"
    assert fields["logger"] == "test.access_log_line"
    assert fields["request_id"] == "abc-1"
    assert {key: fields[key] for key in (
        "remote", "method", "path", "protocol", "status", "bytes", "duration", "user_agent"
    )} == {
        "remote": "127.0.0.1", "method": "POST", "path": '/rpc?a="b"', "protocol": "HTTP/1.1",
        "status": 201, "bytes": 2, "duration": 0.001234, "user_agent": 'evil"\n{"status": 200}',
    }  # fmt: skip


def test_nothing_is_formatted_when_info_is_off() -> None:
    logger = logging.getLogger("test.access_log_off")
    logger.setLevel(logging.WARNING)
    assert AccessLogger(logger, FORMAT).enabled is False
