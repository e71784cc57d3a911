"""Connections as ``rpc-server serve`` serves them (``serving.start_serving``, in this
process so a test can hold a call open): the read deadline, the keep-alive timeout, the
connection cap, and what a client's faults log (one INFO line; never an ERROR, a
traceback or a 500).

Each test talks raw HTTP/1.1 over a socket, as a slow, broken or vanishing client would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import REGISTRY
from rpc_server.server.listening import bind_listeners
from rpc_server.server.serving import Serving, start_serving
from schemas.base import Out, Params
from tests.e2e.conftest import INVALID_REQUEST, SERVICE_UNAVAILABLE

pytestmark = pytest.mark.backends("sqlite")  # about connections, not the database

READ_TIMEOUT = 0.5
# How late a deadline may be kept on a loaded machine.
SLACK = 1.0


class NoParams(Params):
    """Takes no params."""


class Gate:
    """A call that waits until the test lets it answer (``test.wait``)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def wait(self, ctx: RpcContext, actor: Actor | None) -> Any:
        """Waits for the test."""
        self.started.set()
        await self.release.wait()
        return {}


class Records(logging.Handler):
    """Every log record, and a way to wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()

    async def wait_for(self, matches: Callable[[logging.LogRecord], bool]) -> logging.LogRecord:
        async with asyncio.timeout(10):
            while True:
                for record in self.records:
                    if matches(record):
                        return record
                self._arrived.clear()
                await self._arrived.wait()

    def access_line(self, request_id: str) -> Callable[[logging.LogRecord], bool]:
        return lambda r: (
            r.name == "aiohttp.access" and f"request_id={request_id}" in (r.getMessage())
        )

    def problems(self) -> list[str]:
        """ERRORs, tracebacks and 500s: what a client's fault must never cause."""
        return [
            record.getMessage()
            for record in self.records
            if record.levelno >= logging.ERROR
            or record.exc_info
            or (record.name == "aiohttp.access" and '" 500 ' in record.getMessage())
        ]


@pytest.fixture
def records() -> AsyncIterator[Records]:
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler  # type: ignore[misc]  # a generator fixture
    root.removeHandler(handler)
    root.setLevel(level)


StartServer = Callable[..., Awaitable[Serving]]


@pytest.fixture
async def start(settings: Settings) -> AsyncIterator[StartServer]:
    """``await start(gate=…, **settings)``: the production server stack on a free port."""
    started: list[Serving] = []

    async def go(gate: Gate | None = None, **changes: Any) -> Serving:
        methods = [*REGISTRY.methods.values()]
        if gate is not None:
            methods.append(RpcMethod("test.wait", gate.wait, NoParams, Out(), auth=False))
        tuned = dataclasses.replace(
            settings, **{"read_timeout": READ_TIMEOUT, "mail_in_serve": False, **changes}
        )
        app = create_app(tuned, MethodRegistry(methods))
        serving = await start_serving(app, tuned, bind_listeners("127.0.0.1", 0))
        started.append(serving)
        return serving

    yield go
    for serving in started:
        await serving.close()


# The client waits for "100 Continue" before the body: then the app has the request.
CONTINUE = "Expect: 100-continue\r\n"


def rpc_request(
    method: str, *, request_id: str = "test-1", extra: str = "", body: bytes | None = None
) -> bytes:
    body = (
        body
        if body is not None
        else json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode()
    )
    return (
        f"POST /rpc HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


Connect = Callable[[Serving], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(serving)``: a raw connection, closed (if still open) at the end."""
    writers: list[asyncio.StreamWriter] = []

    async def go(serving: Serving) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
        writers.append(writer)
        return reader, writer

    yield go
    for writer in writers:
        writer.close()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (which it must do
    within 10 s: a server that holds it fails the test, never hangs it)."""
    received = b""
    async with asyncio.timeout(10):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP answer: status, headers (lower-case names), JSON body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *header_lines = head.strip().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, json.loads(body) if body else None


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


# --- the read deadline -------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /rpc HTTP/1.1\r\nHost: test\r\nUser-Ag",  # mid-headers
        rpc_request("course.list")[:-5],  # mid-body
    ],
    ids=["mid-headers", "mid-body"],
)
async def test_a_request_that_stops_arriving_is_answered_408_and_closed_at_its_deadline(
    start: StartServer, records: Records, connect: Connect, partial: bytes
) -> None:
    serving = await start()
    reader, writer = await connect(serving)
    sent = time.monotonic()
    writer.write(partial)
    raw = await until_closed(reader)
    elapsed = time.monotonic() - sent
    writer.close()
    assert READ_TIMEOUT - 0.05 <= elapsed < READ_TIMEOUT + SLACK
    status, headers, answer = parse_answer(raw)
    assert (status, headers["connection"]) == (408, "close")
    assert answer["error"]["code"] == INVALID_REQUEST
    assert answer["error"]["data"] == f"The request did not arrive within {READ_TIMEOUT:g} seconds."
    closed = [r for r in records.records if "did not arrive" in r.getMessage()]
    assert [(r.name, r.levelno) for r in closed] == [("rpc_server.connections", logging.INFO)]
    assert records.problems() == []
    assert serving.guard.open == 0


async def test_a_trickle_is_cut_at_the_deadline_however_steady(
    start: StartServer, records: Records, connect: Connect
) -> None:
    """A client sending a byte now and then (slowloris) keeps nothing alive: the
    deadline counts from the request's first byte, not from the last one."""
    serving = await start()
    reader, writer = await connect(serving)
    sent = time.monotonic()
    closed = asyncio.create_task(until_closed(reader))
    for byte in b"POST /rpc HTTP/1.1\r\nHost: test\r\nUser-Agent: slow":
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)  # the client's pace, not a synchronisation
    raw = await closed
    assert time.monotonic() - sent < READ_TIMEOUT + SLACK
    assert parse_answer(raw)[0] == 408
    writer.close()


async def test_a_connection_that_never_sends_is_closed_quietly(
    start: StartServer, records: Records, connect: Connect
) -> None:
    serving = await start()
    reader, writer = await connect(serving)
    opened = time.monotonic()
    assert await until_closed(reader) == b""  # no request: nothing to answer
    assert READ_TIMEOUT - 0.05 <= time.monotonic() - opened < READ_TIMEOUT + SLACK
    assert [r for r in records.records if r.levelno >= logging.INFO and "closed" in r.msg] == []
    writer.close()


async def test_the_deadline_ends_once_the_request_has_arrived(
    start: StartServer, records: Records, connect: Connect
) -> None:
    """A call may run longer than the read timeout (its own timeout applies)."""
    gate = Gate()
    serving = await start(gate)
    reader, writer = await connect(serving)
    writer.write(rpc_request("test.wait", request_id="long-call"))
    await gate.started.wait()
    asyncio.get_running_loop().call_later(READ_TIMEOUT * 3, gate.release.set)
    status, _, answer = await read_answer(reader)
    assert (status, answer["result"]) == (200, {})
    # Keep-alive: the same connection serves the next request.
    writer.write(rpc_request("course.list", request_id="next"))
    status, _, answer = await read_answer(reader)
    assert (status, answer["id"]) == (200, 1)
    writer.close()
    assert records.problems() == []


async def test_pipelined_requests_are_all_answered(
    start: StartServer, records: Records, connect: Connect
) -> None:
    serving = await start()
    reader, writer = await connect(serving)
    writer.write(b"".join(rpc_request("course.list", request_id=f"p{n}") for n in range(3)))
    for n in range(3):
        status, headers, _ = await read_answer(reader)
        assert (status, headers["x-request-id"]) == (200, f"p{n}")
    writer.close()


# --- keep-alive --------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    start: StartServer, records: Records, connect: Connect
) -> None:
    keepalive = 0.5
    serving = await start(keepalive_timeout=keepalive, read_timeout=5.0)
    reader, writer = await connect(serving)
    writer.write(rpc_request("course.list", request_id="first"))
    assert (await read_answer(reader))[0] == 200
    answered = time.monotonic()
    assert await until_closed(reader) == b""
    idle = time.monotonic() - answered
    assert keepalive - 0.05 <= idle < keepalive + SLACK, idle
    writer.close()
    assert records.problems() == []


# --- the connection cap ------------------------------------------------------------------


async def test_connections_past_the_cap_are_refused_503_and_served_again_below_it(
    start: StartServer, records: Records, connect: Connect
) -> None:
    cap = 3
    serving = await start(max_connections=cap, read_timeout=10.0, keepalive_timeout=10.0)
    held = []
    for n in range(cap):  # open, answered, and kept open (keep-alive)
        reader, writer = await connect(serving)
        writer.write(rpc_request("course.list", request_id=f"held-{n}"))
        assert (await read_answer(reader))[0] == 200
        held.append((reader, writer))
    assert serving.guard.open == cap
    for n in range(5):
        reader, writer = await connect(serving)
        writer.write(rpc_request("course.list", request_id=f"refused-{n}"))
        raw = await until_closed(reader)  # answered at once, then closed
        writer.close()
        status, headers, answer = parse_answer(raw)
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert answer == {
            "jsonrpc": "2.0",
            "error": {
                "code": SERVICE_UNAVAILABLE,
                "message": "Service unavailable",
                "data": "Too many open connections.",
            },
            "id": None,
        }
    warnings = [r for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # refusals are summed up, not logged one by one
    assert "RPC_SERVER_MAX_CONNECTIONS" in warnings[0].getMessage()
    assert serving.guard.open == cap

    # One held connection goes away (its close seen by the server: it closes too).
    reader, writer = held.pop()
    writer.write_eof()
    assert await until_closed(reader) == b""
    writer.close()
    reader, writer = await connect(serving)
    writer.write(rpc_request("course.list", request_id="after"))
    assert (await read_answer(reader))[0] == 200
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    assert serving.guard.refusing == 0
    assert records.problems() == []


# --- clients that go away ----------------------------------------------------------------


async def test_a_client_gone_mid_body_is_one_info_line_and_499_not_an_error_and_500(
    start: StartServer, records: Records, connect: Connect
) -> None:
    serving = await start()
    reader, writer = await connect(serving)
    request = rpc_request("course.list", request_id="gone-mid-body", extra=CONTINUE)
    head, body = request.split(b"\r\n\r\n", 1)
    writer.write(head + b"\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body[:5])  # the app has the request: part of its body, then gone
    writer.close()
    access = await records.wait_for(records.access_line("gone-mid-body"))
    assert '"POST /rpc HTTP/1.1" 499 ' in access.getMessage()
    gone = [r for r in records.records if "went away" in r.getMessage()]
    assert [(r.name, r.levelno) for r in gone] == [("rpc_server.connections", logging.INFO)]
    assert "of " in gone[0].getMessage() and "body bytes came" in gone[0].getMessage()
    assert records.problems() == []


async def test_a_client_gone_before_its_answer_is_logged_499(
    start: StartServer, records: Records, connect: Connect
) -> None:
    gate = Gate()
    serving = await start(gate)
    reader, writer = await connect(serving)
    writer.write(rpc_request("test.wait", request_id="gone-before-answer"))
    await gate.started.wait()
    writer.write_eof()  # the client is done with this connection
    assert await until_closed(reader) == b""  # and the server has seen it go
    writer.close()
    gate.release.set()  # the call ends; its answer has nowhere to go
    access = await records.wait_for(records.access_line("gone-before-answer"))
    assert '"POST /rpc HTTP/1.1" 499 ' in access.getMessage()
    assert records.problems() == []


async def test_malformed_http_is_answered_400_and_logged_at_info(
    start: StartServer, records: Records, connect: Connect
) -> None:
    serving = await start()
    for garbage in (
        b"POST /rpc HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the HTTP port
    ):
        reader, writer = await connect(serving)
        writer.write(garbage)
        raw = await until_closed(reader)
        writer.close()
        assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n")[0]
    malformed = [r for r in records.records if r.name == "rpc_server.http"]
    assert len(malformed) == 3 and all(r.levelno <= logging.INFO for r in malformed)
    assert all(len(r.getMessage().splitlines()) == 1 for r in malformed)
    assert records.problems() == []
