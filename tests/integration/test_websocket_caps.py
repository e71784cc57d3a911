"""WebSockets and the connection caps of a real ``rpc-server serve`` process.

Open WebSockets count against ``RPC_SERVER_WS_MAX_CONNECTIONS``, not against the HTTP
cap ``RPC_SERVER_MAX_CONNECTIONS``: sockets held open by subscribers must never starve
HTTP calls. Past the WebSocket cap the upgrade answers 503 with a JSON-RPC error, and a
closed socket frees its place.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.processes import running_server

COURSE_LIST = {"jsonrpc": "2.0", "method": "course.list", "id": 1}


async def test_websockets_do_not_count_against_the_http_cap(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_MAX_CONNECTIONS": "3",
        "RPC_SERVER_WS_MAX_CONNECTIONS": "4",
    }
    with running_server(env) as (port, _):
        url = f"http://127.0.0.1:{port}/rpc"
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(url) for _ in range(4)]
            # Four sockets open, more than the HTTP cap of 3: HTTP calls still answer.
            for _ in range(3):
                async with (
                    aiohttp.ClientSession() as caller,
                    caller.post(url, json=COURSE_LIST) as response,
                ):
                    assert response.status == 200
                    assert (await response.json())["id"] == 1
            # Each socket still answers its calls.
            for ws in sockets:
                await ws.send_json(COURSE_LIST)
                assert (await ws.receive_json(timeout=5))["id"] == 1
            # A fifth socket is past the WebSocket cap: 503 with a JSON-RPC error body.
            async with aiohttp.ClientSession() as other:
                try:
                    await other.ws_connect(url)
                except aiohttp.WSServerHandshakeError as refused:
                    assert refused.status == 503
                else:
                    raise AssertionError("a fifth WebSocket was accepted")
            await sockets.pop().close()
            # The closed socket's place is free again (the server notices the close).
            for _ in range(50):
                try:
                    sockets.append(await session.ws_connect(url))
                    break
                except aiohttp.WSServerHandshakeError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("a closed WebSocket's place was never freed")
            for ws in sockets:
                await ws.close()
