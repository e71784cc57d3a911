"""Request bodies sent with a ``Content-Encoding``: gzip and deflate, decoded with a bound.

Where it sits: the POST handlers read their body with ``read_body`` (``rpc_server.app``),
which comes here when the request names a content coding. aiohttp's own decoding is
off for this app (``auto_decompress=False`` in its handler arguments), so this module
is the one place that decides:

- ``identity`` (or no header): the body as sent.
- ``gzip`` (also ``x-gzip``, and several gzip members in a row) and ``deflate`` (zlib
  data as RFC 9110 says, or the raw deflate some clients send): decoded here, as it
  arrives, into at most ``limit + 1`` bytes. The limit (``RPC_SERVER_MAX_BODY_BYTES``)
  holds for the body as sent and for the decoded body, so a zip bomb is refused with 413
  after decoding at most ``limit + 1`` bytes, never inflated in full.
- anything else (``br``, ``zstd``, ``compress``, two codings stacked, an unknown
  token): refused with 415 and ``Accept-Encoding: gzip, deflate``.

A body that does not decode (not gzip at all, cut short, trailing bytes) is refused
with 400 and -32700.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable
from typing import Final, Protocol

from aiohttp import hdrs, web

from rpc_server.http.errors import RequestRefused
from rpc_server.jsonrpc.errors import INVALID_REQUEST, PARSE_ERROR

GZIP: Final = "gzip"
DEFLATE: Final = "deflate"
_CODINGS: Final = {"gzip": GZIP, "x-gzip": GZIP, "deflate": DEFLATE}
ACCEPTED: Final = f"{GZIP}, {DEFLATE}"


class _Decompressor(Protocol):
    """What ``zlib.decompressobj`` returns, as far as this module uses it."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class BodyTooLarge(Exception):
    """The body, as sent or decoded, is larger than the limit."""


def coding_of(request: web.Request) -> str | None:
    """The body's content coding (``GZIP`` or ``DEFLATE``), or None if sent as it is.

    Raises RequestRefused (415) for any other coding, or more than one.
    """
    values = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    if not values:
        return None  # the common case, at the cost of one lookup
    codings = [
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    ]
    codings = [coding for coding in codings if coding != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _CODINGS:
        return _CODINGS[codings[0]]
    raise RequestRefused(
        415,
        INVALID_REQUEST,
        "Invalid Request",
        "Unsupported Content-Encoding: send the body as it is, or with gzip or deflate.",
        headers={hdrs.ACCEPT_ENCODING: ACCEPTED},
    )


def _undecodable(coding: str) -> RequestRefused:
    return RequestRefused(400, PARSE_ERROR, "Parse error", f"The body is not valid {coding} data.")


class BoundedDecoder:
    """Decodes one gzip or deflate body fed in pieces, never past ``limit + 1`` bytes."""

    def __init__(self, coding: str, limit: int) -> None:
        self._coding = coding
        self._limit = limit
        self._decoded = bytearray()
        self._stream: _Decompressor | None = None

    def _start(self, first: bytes) -> _Decompressor:
        if self._coding == GZIP:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 1950 (zlib) data starts with compression method 8 in its low nibble; raw
        # deflate (RFC 1951), which some clients send as "deflate", does not.
        return zlib.decompressobj(zlib.MAX_WBITS if first[0] & 0x0F == 8 else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        """Decode ``data``. Raises BodyTooLarge, or RequestRefused (400) if it is not
        valid data of its coding."""
        while data:
            if self._stream is None:
                self._stream = self._start(data)
            elif self._stream.eof:
                # Bytes after the end of the data: another gzip member may follow
                # (RFC 1952), anything else is not the coding.
                if self._coding != GZIP:
                    raise _undecodable(self._coding)
                self._stream = self._start(data)
            room = self._limit + 1 - len(self._decoded)
            try:
                # At most ``room`` bytes come out: decoding stops just past the limit.
                self._decoded += self._stream.decompress(data, room)
            except zlib.error:
                raise _undecodable(self._coding) from None
            if len(self._decoded) > self._limit:
                raise BodyTooLarge
            # Below the limit the stream took all of ``data``; what it did not use lies
            # after the end of its data.
            data = self._stream.unused_data if self._stream.eof else b""

    def finish(self) -> bytes:
        """The decoded body. Raises RequestRefused (400) if the data ended early."""
        if self._stream is None or not self._stream.eof:
            raise _undecodable(self._coding)
        return bytes(self._decoded)


async def read_decoded(chunks: AsyncIterable[bytes], coding: str, limit: int) -> bytes:
    """Read and decode a body whose coding is ``coding``; at most ``limit`` bytes as sent
    and as decoded.

    Raises BodyTooLarge (the rest of the body is left unread), or RequestRefused (400).
    """
    decoder = BoundedDecoder(coding, limit)
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge
        decoder.feed(chunk)
    return decoder.finish()
