"""aiohttp's ERROR about malformed HTTP becomes one INFO line; the server's own errors stay."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine

from rpc_server.server.client_faults import ClientFaultFilter, server_logger


@pytest.fixture(autouse=True)
def info_on() -> Iterator[None]:
    logger = server_logger()
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def error_record(exc: BaseException) -> logging.LogRecord:
    """The record aiohttp's ``handle_error`` makes (``logger.exception``)."""
    try:
        raise exc
    except BaseException:
        exc_info = sys.exc_info()
    return logging.makeLogRecord(
        {
            "name": "rpc_server.http",
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": "Error handling request from %s",
            "args": ("203.0.113.9",),
            "exc_info": exc_info,
        }
    )


def test_malformed_http_is_one_info_line_without_the_request_bytes() -> None:
    record = error_record(BadHttpMessage("Invalid header token:\n\n  b'Bad Header'\n     ^"))
    assert ClientFaultFilter().filter(record) is True
    assert (record.levelno, record.levelname) == (logging.INFO, "INFO")
    assert record.getMessage() == "malformed HTTP from 203.0.113.9: Invalid header token"
    assert record.exc_info is None and record.exc_text is None


def test_a_status_line_of_garbage_is_summed_up_too() -> None:
    record = error_record(BadStatusLine(b"\x16\x03\x01"))
    ClientFaultFilter().filter(record)
    assert record.getMessage().startswith("malformed HTTP from 203.0.113.9: ")
    assert "\n" not in record.getMessage()
    assert record.levelno == logging.INFO


def test_the_servers_own_errors_stay_errors_with_their_traceback() -> None:
    for exc in (ValueError("a bug"), ConnectionRefusedError("the database is gone")):
        record = error_record(exc)
        assert ClientFaultFilter().filter(record) is True
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert record.getMessage() == "Error handling request from 203.0.113.9"


def test_an_info_line_is_dropped_where_info_is_off() -> None:
    server_logger().setLevel(logging.WARNING)
    assert ClientFaultFilter().filter(error_record(BadHttpMessage("bad"))) is False
    assert sum(isinstance(f, ClientFaultFilter) for f in server_logger().filters) == 1
