"""Content codings of request bodies: which are accepted, and decoding with a bound."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from rpc_server.http.content_encoding import (
    DEFLATE,
    GZIP,
    BodyTooLarge,
    BoundedDecoder,
    coding_of,
    read_decoded,
)
from rpc_server.http.errors import RequestRefused

BODY = b'{"jsonrpc": "2.0", "method": "course.list", "id": 1}' + b" " * 5000


def request_with(*encodings: str) -> web.Request:
    headers = CIMultiDict([("Content-Encoding", value) for value in encodings])
    return make_mocked_request("POST", "/rpc", headers=headers)


@pytest.mark.parametrize(
    "encodings,coding",
    [
        ((), None),
        (("",), None),
        (("identity",), None),
        (("Identity",), None),
        (("gzip",), GZIP),
        ((" GZip ",), GZIP),
        (("x-gzip",), GZIP),
        (("deflate",), DEFLATE),
        (("identity, gzip",), GZIP),
        (("gzip", "identity"), GZIP),
    ],
)
def test_accepted_codings(encodings: tuple[str, ...], coding: str | None) -> None:
    assert coding_of(request_with(*encodings)) == coding


@pytest.mark.parametrize(
    "encodings",
    [("br",), ("zstd",), ("compress",), ("gzip, gzip",), ("gzip", "deflate"), ("gzip;q=1",)],
)
def test_other_codings_are_refused_with_415(encodings: tuple[str, ...]) -> None:
    with pytest.raises(RequestRefused) as refused:
        coding_of(request_with(*encodings))
    assert refused.value.status == 415
    assert refused.value.headers == {"Accept-Encoding": "gzip, deflate"}


def raw_deflate(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


@pytest.mark.parametrize(
    "coding,encoded",
    [
        (GZIP, gzip.compress(BODY)),
        (GZIP, gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])),
        (DEFLATE, zlib.compress(BODY)),
        (DEFLATE, raw_deflate(BODY)),
    ],
    ids=["gzip", "gzip-members", "zlib", "raw-deflate"],
)
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_decodes_in_any_pieces(coding: str, encoded: bytes, piece: int) -> None:
    decoder = BoundedDecoder(coding, limit=len(BODY))
    for start in range(0, len(encoded), piece):
        decoder.feed(encoded[start : start + piece])
    assert decoder.finish() == BODY


def test_one_byte_over_the_limit_is_too_large() -> None:
    decoder = BoundedDecoder(GZIP, limit=len(BODY) - 1)
    with pytest.raises(BodyTooLarge):
        decoder.feed(gzip.compress(BODY))


def test_a_bomb_is_decoded_no_further_than_the_limit() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()
    assert len(bomb) < 300_000  # 256 MiB decoded
    decoder = BoundedDecoder(GZIP, limit=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            decoder.feed(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    "coding,encoded",
    [
        (GZIP, b"not gzip at all"),
        (GZIP, gzip.compress(BODY)[:-8]),
        (GZIP, gzip.compress(BODY) + b"junk"),
        (DEFLATE, zlib.compress(BODY) + b"\x00"),
        (DEFLATE, zlib.compress(BODY)[:-4]),
        (GZIP, b""),
    ],
    ids=["garbage", "cut-short", "gzip-trailing", "deflate-trailing", "deflate-cut", "empty"],
)
def test_data_that_does_not_decode_is_a_400(coding: str, encoded: bytes) -> None:
    decoder = BoundedDecoder(coding, limit=1 << 20)
    with pytest.raises(RequestRefused) as refused:
        decoder.feed(encoded)
        decoder.finish()
    assert (refused.value.status, refused.value.code) == (400, -32700)
    assert refused.value.data == f"The body is not valid {coding} data."


async def pieces(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_the_limit_holds_for_the_body_as_sent_too() -> None:
    stored = gzip.compress(BODY, compresslevel=0)  # larger than what it decodes to
    assert len(stored) > len(BODY)
    with pytest.raises(BodyTooLarge):
        await read_decoded(pieces(stored), GZIP, limit=len(BODY))
    assert await read_decoded(pieces(stored), GZIP, limit=len(stored)) == BODY
