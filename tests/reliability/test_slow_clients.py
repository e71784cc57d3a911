"""Slow, vanishing and hostile clients against a real ``rpc-server serve`` process.

- 2,000 connections that stall mid-headers or mid-body are all answered 408 and closed
  within the read timeout plus a second, each counted from its own opening; the server's
  open file descriptors (``/proc/<pid>/fd``) come back to where they were; a well-behaved
  client is answered meanwhile; the log has one INFO line per stalled connection and no
  ERROR, no traceback, no 500. The figures go to ``tests/reliability/README.md``.
- A client that goes away mid-body, malformed HTTP and a forged User-Agent: one INFO
  line each, the access log shows 499 and 400, the User-Agent escaped, no ERROR.
- ``RPC_SERVER_LOG_FORMAT=json``: every log line the process writes is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import World
from tests.reliability.load import ServerProcess, server_env, started

pytestmark = pytest.mark.backends("sqlite")  # about connections, not the database

STALLED = 2000
# Long enough for all of them to be open at once (opening 2,000 takes about 3 s here).
READ_TIMEOUT = 5.0
# How late a stalled connection may be closed, past the read timeout.
SLACK = 1.0
# Connections are opened this many at a time (the accept queue holds 128).
WAVE = 100
MID_HEADERS = b"POST /rpc HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nUser-Ag"
MID_BODY = (
    b"POST /rpc HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 60\r\n\r\n"
    b'{"jsonrpc": "2.0", "method": "cou'
)
COURSE_LIST = {"jsonrpc": "2.0", "method": "course.list", "id": 1}
# The banner ``serve`` prints on stdout (not a log line).
BANNER = ("JSON-RPC 2.0 endpoint:", "try: curl")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def enough_descriptors(needed: int) -> None:
    """Raise this process's descriptor limit (the server inherits it) if it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def stalled_connection(
    port: int, partial: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(partial)
    await writer.drain()
    return reader, writer, opened


async def until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: float
) -> tuple[float, bytes]:
    """How long the server kept the connection from its opening, and what it sent."""
    received = b""
    async with asyncio.timeout(READ_TIMEOUT + 30):  # a server that holds it fails the test
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    held = time.monotonic() - opened
    writer.close()
    return held, received


class WellBehaved:
    """A client calling course.list one call after another until stopped."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[Any] = []
        self.stop = asyncio.Event()

    async def call(self) -> None:
        started = time.monotonic()
        async with self.session.post(f"{self.url}/rpc", json=COURSE_LIST) as response:
            body = await response.json()
        self.latencies.append(time.monotonic() - started)
        if response.status != 200 or len(body.get("result", ())) != 2:
            self.failures.append((response.status, body))

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.call()
            await asyncio.sleep(0.02)  # a steady client's pace


async def test_two_thousand_stalled_connections_are_closed_in_time_and_cost_nothing_after(
    database_url: str, tmp_path: Path, world: World
) -> None:
    enough_descriptors(2 * STALLED + 1024)  # our ends, and the server's
    env = server_env(
        database_url,
        tmp_path,
        read_timeout=READ_TIMEOUT,
        max_connections=STALLED + 100,
        # No receipt deliverer: it would open a second database connection (two more
        # descriptors) at a time of its own, and blur the count.
        mail_in_serve="false",
    )
    server = ServerProcess(env, tmp_path / "server.log")
    async with started(server), aiohttp.ClientSession() as session:
        client = WellBehaved(session, server.url)
        await client.call()  # its connection, and the pool's, are open from here on
        fds_before, rss_before = open_fds(server.pid), server.rss_kib()
        calls = asyncio.create_task(client.run())

        began = time.monotonic()
        waiting = []
        for wave in range(STALLED // WAVE):
            partial = MID_HEADERS if wave % 2 == 0 else MID_BODY
            opened = await asyncio.gather(
                *(stalled_connection(server.port, partial) for _ in range(WAVE))
            )
            waiting += [asyncio.create_task(until_closed(*one)) for one in opened]
        opening = time.monotonic() - began
        fds_during, rss_during = open_fds(server.pid), server.rss_kib()

        closed = await asyncio.gather(*waiting)
        client.stop.set()
        await calls
        after_all = time.monotonic() - began
        # Every descriptor is given back: the server closes a connection before its
        # client can see it closed, so this holds at once (a moment's grace for the
        # last ones' close to be processed).
        fds_after = open_fds(server.pid)
        deadline = time.monotonic() + 2
        while fds_after != fds_before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            fds_after = open_fds(server.pid)
        rss_after = server.rss_kib()
        assert await server.stop() == 0

    held = sorted(seconds for seconds, _ in closed)
    print(
        f"\n{STALLED} stalled connections opened in {opening:.2f}s, all closed after "
        f"{after_all:.2f}s; held {held[0]:.2f} to {held[-1]:.2f}s "
        f"(median {held[len(held) // 2]:.2f}s, read timeout {READ_TIMEOUT:g}s); "
        f"server fds {fds_before} → {fds_during} → {fds_after}; "
        f"RSS {rss_before // 1024} → {rss_during // 1024} → {rss_after // 1024} MB; "
        f"well-behaved client: {len(client.latencies)} calls, max "
        f"{max(client.latencies) * 1000:.0f} ms"
    )
    assert held[0] > READ_TIMEOUT / 2  # (measured from our side: the server's clock
    # starts at its accept, a little before our coroutine resumes under this load)
    assert held[-1] <= READ_TIMEOUT + SLACK, held[-10:]
    assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for _, answer in closed)
    assert fds_during >= fds_before + STALLED  # they were all held at once
    assert fds_after == fds_before
    assert client.failures == []
    assert len(client.latencies) > 10

    log = server.log()
    assert [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line] == []
    assert log.count(f"its request did not arrive within {READ_TIMEOUT:g}s") == STALLED
    timed_out_bodies = [line for line in log.splitlines() if '"POST /rpc HTTP/1.1" 408 ' in line]
    assert len(timed_out_bodies) == STALLED // 2
    assert '" 500 ' not in log


async def test_gone_malformed_and_forged_requests_are_info_lines_in_the_text_log(
    database_url: str, tmp_path: Path
) -> None:
    server = ServerProcess(server_env(database_url, tmp_path), tmp_path / "server.log")
    async with started(server):
        await client_faults(server)
        assert await server.stop() == 0
    lines = server.log().splitlines()
    assert [line for line in lines if " ERROR " in line or "Traceback" in line] == []
    assert not [line for line in lines if '" 500 ' in line]
    [gone] = [line for line in lines if "went away" in line]
    assert " INFO rpc_server.connections [gone-mid-body] client 127.0.0.1 went away" in gone
    [gone_access] = [line for line in lines if "request_id=gone-mid-body" in line]
    assert '"POST /rpc HTTP/1.1" 499 ' in gone_access
    malformed = [line for line in lines if "malformed HTTP" in line]
    assert len(malformed) == 1 and " INFO rpc_server.http " in malformed[0]
    [forged] = [line for line in lines if "request_id=forged-agent" in line]
    assert '"POST /rpc HTTP/1.1" 200 ' in forged
    assert forged.endswith('"x\\x22 200 1 0.1 \\x22-\\x22 request_id=evil" request_id=forged-agent')
    assert forged.count('"') == 4  # the request line and the User-Agent, nothing forged


async def test_json_log_format_makes_every_line_one_json_object(
    database_url: str, tmp_path: Path
) -> None:
    env = server_env(database_url, tmp_path, log_format="json")
    server = ServerProcess(env, tmp_path / "server.log")
    async with started(server):
        await client_faults(server)
        assert await server.stop() == 0
    objects = []
    for line in server.log().splitlines():
        if line.startswith(BANNER):
            continue
        objects.append(json.loads(line))  # every other line is one JSON object
    assert {"INFO"} <= {entry["level"] for entry in objects} <= {"INFO", "WARNING"}
    access = {
        entry["request_id"]: entry for entry in objects if entry["logger"] == "aiohttp.access"
    }
    assert access["forged-agent"]["user_agent"] == 'x" 200 1 0.1 "-" request_id=evil'
    assert (access["forged-agent"]["status"], access["forged-agent"]["path"]) == (200, "/rpc")
    assert access["gone-mid-body"]["status"] == 499
    [gone] = [entry for entry in objects if "went away" in entry["message"]]
    assert (gone["logger"], gone["level"], gone["request_id"]) == (
        "rpc_server.connections", "INFO", "gone-mid-body",
    )  # fmt: skip
    assert next(e for e in objects if e["logger"] == "rpc_server.http")["level"] == "INFO"


async def client_faults(server: ServerProcess) -> None:
    """A client gone mid-body, malformed HTTP, and a User-Agent forging access-log fields."""
    body = json.dumps(COURSE_LIST).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /rpc HTTP/1.1\r\nHost: test\r\nX-Request-ID: gone-mid-body\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    # Once told to go on, the app has the request: part of the body, then gone.
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body[:7])
    await writer.drain()
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /rpc HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.")
    writer.close()

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}/rpc",
            json=COURSE_LIST,
            headers={
                "User-Agent": 'x" 200 1 0.1 "-" request_id=evil',
                "X-Request-ID": "forged-agent",
            },
        ) as response,
    ):
        assert response.status == 200
