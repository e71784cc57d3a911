"""The connection guard's refusals in a real ``rpc-server serve`` process's metrics.

A connection past ``RPC_SERVER_MAX_CONNECTIONS`` (answered 503) and a request that does
not arrive within ``RPC_SERVER_READ_TIMEOUT`` (answered 408) never reach the
application, so the guard itself counts them: ``rpc_server_requests_refused_total`` with
``reason`` ``too_many_connections`` and ``read_timeout``.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import running_server


async def refusals(port: int) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "rpc_server_requests_refused"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def read_answer(connection: socket.socket) -> bytes:
    connection.settimeout(10)
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


async def test_refused_and_timed_out_connections_are_counted(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_MAX_CONNECTIONS": "2",
        "RPC_SERVER_READ_TIMEOUT": "1",
    }
    with running_server(env) as (port, _):
        before = await refusals(port)
        assert before["too_many_connections"] == 0
        assert before["read_timeout"] == 0
        # Two connections hold the cap, each with a request that never ends: the third
        # is answered 503 at once; the two are answered 408 at the read deadline.
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for connection in held:
            connection.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await asyncio.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as third:
            assert read_answer(third).startswith(b"HTTP/1.1 503")
        for connection in held:
            with connection:
                assert (await asyncio.to_thread(read_answer, connection)).startswith(
                    b"HTTP/1.1 408"
                )
        after = await refusals(port)
        assert after["too_many_connections"] == 1
        assert after["read_timeout"] == 2
