"""The access log: one line per HTTP request with its request id, unless turned off."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.processes import running_server


def call(port: int, request_id: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": "course.list", "id": 1}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rpc", data=body, headers={"X-Request-ID": request_id}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["id"] == 1


@pytest.mark.parametrize("enabled", [True, False])
async def test_access_log_lines_follow_the_setting(
    enabled: bool, database_url: str, tmp_path: Path
) -> None:
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_ACCESS_LOG": "true" if enabled else "false",
    }
    output: list[str] = []
    with running_server(env, output=output) as (port, _):
        for n in range(3):
            call(port, f"access-log-test-{n}")
    [log] = output
    lines = [line for line in log.splitlines() if '"POST /rpc HTTP/1.1" 200' in line]
    if enabled:
        assert [line.rsplit("request_id=", 1)[1] for line in lines] == [
            f"access-log-test-{n}" for n in range(3)
        ]
        # The whole line, as the text format writes a record (written without one).
        for line in lines:
            assert re.fullmatch(
                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO aiohttp\.access \[-\] "
                r'127\.0\.0\.1 "POST /rpc HTTP/1\.1" 200 \d+ \d+\.\d{6} '
                r'"Python-urllib/3\.\d+" request_id=access-log-test-\d',
                line,
            ), line
    else:
        assert lines == []
        assert "JSON-RPC 2.0 endpoint" in log  # the server did log, just not requests


async def test_a_websocket_is_logged_as_switching_protocols_when_it_ends(
    database_url: str, tmp_path: Path
) -> None:
    """The upgrade was answered (101); the socket's end, whoever closes it, is not a
    client leaving before its answer (499)."""
    env = {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(tmp_path / "m")}
    output: list[str] = []
    with running_server(env, output=output) as (port, _):
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}/rpc")
            await ws.send_json({"jsonrpc": "2.0", "method": "course.list", "id": 1})
            assert (await ws.receive_json(timeout=5))["id"] == 1
            await ws.close()
        call(port, "after-the-socket")  # its line follows the socket's
    [log] = output
    lines = [line for line in log.splitlines() if '"GET /rpc HTTP/1.1"' in line]
    assert len(lines) == 1 and '"GET /rpc HTTP/1.1" 101 ' in lines[0], lines
