"""Reading a request's body (``rpc_server.app.read_body``) on aiohttp's own stream: a body
that came whole with its headers is taken at once, without the deadline and fault
handling of a body still arriving; anything else goes the long way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request

from rpc_server import app as app_module
from rpc_server.config import Settings
from rpc_server.server.client_faults import MalformedBody

BODY = b'{"jsonrpc":"2.0","method":"purchase.get","params":{"purchase_id":"p_1"},"id":1}'


class Protocol:
    """What a StreamReader asks of its protocol (flow control)."""

    _reading_paused = False
    connected = True

    def pause_reading(self, **_: Any) -> None: ...

    def resume_reading(self, **_: Any) -> None: ...


class Transport:
    def get_protocol(self) -> None:
        return None  # no guarded connection: read_body keeps the deadline itself

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False


@pytest.fixture
def long_way(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each time read_body goes the long way (``receiving_body``), with its deadline."""
    taken: list[float] = []
    original = app_module.receiving_body

    @contextlib.asynccontextmanager
    async def recorded(request: web.Request, read_timeout: float) -> AsyncIterator[None]:
        taken.append(read_timeout)
        async with original(request, read_timeout):
            yield

    monkeypatch.setattr(app_module, "receiving_body", recorded)
    return taken


def request_with(
    stream: StreamReader, length: int | None, headers: dict[str, str] | None = None
) -> web.Request:
    application = web.Application()
    application[app_module.SETTINGS] = Settings(read_timeout=1.5)
    all_headers = dict(headers or {})
    if length is not None:
        all_headers["Content-Length"] = str(length)
    return make_mocked_request(
        "POST", "/rpc", headers=all_headers, payload=stream, app=application,
        transport=Transport(),
    )  # fmt: skip


def stream_of(*chunks: bytes, eof: bool = True) -> StreamReader:
    stream = StreamReader(Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    for chunk in chunks:
        stream.feed_data(chunk)
    if eof:
        stream.feed_eof()
    return stream


async def test_a_body_that_came_whole_with_its_headers_is_taken_at_once(
    long_way: list[float],
) -> None:
    body = await app_module.read_body(request_with(stream_of(BODY), len(BODY)), 1024)
    assert body == BODY
    split = stream_of(BODY[:10], BODY[10:50], BODY[50:])  # several chunks, all there
    assert await app_module.read_body(request_with(split, len(BODY)), 1024) == BODY
    assert long_way == []


async def test_a_body_still_arriving_goes_the_long_way_and_is_waited_for(
    long_way: list[float],
) -> None:
    stream = stream_of(BODY[:20], eof=False)
    reading = asyncio.ensure_future(app_module.read_body(request_with(stream, len(BODY)), 1024))
    await asyncio.sleep(0)
    assert not reading.done()
    stream.feed_data(BODY[20:])
    stream.feed_eof()
    assert await reading == BODY
    assert long_way == [1.5]  # under RPC_SERVER_READ_TIMEOUT


async def test_every_other_body_goes_the_long_way(long_way: list[float]) -> None:
    too_long = request_with(stream_of(BODY), len(BODY))
    assert await app_module.read_body(too_long, len(BODY) - 1) is None  # 413 follows
    chunked = request_with(stream_of(BODY), None)
    assert await app_module.read_body(chunked, 1024) == BODY
    empty = request_with(stream_of(), 0)
    assert await app_module.read_body(empty, 1024) == b""
    assert long_way == [1.5, 1.5, 1.5]


async def test_a_broken_body_is_the_clients_400_not_a_500(long_way: list[float]) -> None:
    stream = stream_of(BODY)
    stream.set_exception(web.RequestPayloadError("Not enough data for satisfy content length"))
    with pytest.raises(MalformedBody):
        await app_module.read_body(request_with(stream, len(BODY)), 1024)
    assert long_way == [1.5]
