"""A WebSocket JSON-RPC 2.0 client for the tests of live purchase updates (issue 18).

``LiveClient`` wraps an open ``aiohttp`` WebSocket (from ``TestClient.ws_connect`` in
process, or ``ClientSession.ws_connect`` against a real server) and reads it in a task of
its own from the start: every text frame is parsed and kept in arrival order (``frames``),
answers are filed by id, notifications (``purchase.updated``, ``purchase.resync``) are
kept in a list, and a close is recorded with its code and reason. ``call`` sends one
request and waits for its answer; ``wait_for`` waits for any condition on what arrived,
always with a deadline, never with a fixed sleep.

The raw helpers at the bottom (``raw_upgrade``, ``masked_frame``, ``read_frames``) speak
RFC 6455 over a plain socket, for a peer that misbehaves on purpose (one that never reads).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

DEFAULT_WAIT = 5.0

# WebSocket close codes (RFC 6455, 7.4.1).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009


@dataclass(frozen=True)
class Closed:
    """How a socket ended: the close frame's code and reason (None: no close frame came)."""

    code: int | None
    reason: str
    at: float  # time.monotonic() when the client saw it


class LiveClient:
    """One WebSocket, read in the background from the moment it is wrapped.

    Use ``async with LiveClient(ws) as live:``; leaving closes the socket and the reader.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        # Every text frame as parsed JSON (bytes for a binary one), in arrival order.
        self.frames: list[Any] = []
        self.binary_frames: list[bytes] = []
        self.notifications: list[dict[str, Any]] = []
        # When each notification arrived (time.monotonic()), parallel to ``notifications``.
        self.notification_arrivals: list[float] = []
        # Answers by id (the first with each id); answers with a null id, and any second
        # answer to an id, are kept apart.
        self.answers: dict[str, Any] = {}
        self.null_id_answers: list[dict[str, Any]] = []
        self.duplicate_answers: list[dict[str, Any]] = []
        # When each frame arrived (time.monotonic()), parallel to ``frames``.
        self.arrivals: list[float] = []
        self.closed: Closed | None = None
        self.pings = 0
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def __aenter__(self) -> LiveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if not self.ws.closed:
            await self.ws.close()
        await asyncio.wait_for(asyncio.shield(self._reader), timeout=DEFAULT_WAIT)

    # --- reading ---------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                self.closed = Closed(None, "", time.monotonic())
                break
            if message.type is aiohttp.WSMsgType.TEXT:
                self._file(json.loads(message.data))
            elif message.type is aiohttp.WSMsgType.BINARY:
                self.binary_frames.append(message.data)
                self._changed.set()
            elif message.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                self.pings += message.type is aiohttp.WSMsgType.PING  # (with autoping off)
            elif message.type is aiohttp.WSMsgType.CLOSE:
                self.closed = Closed(message.data, message.extra or "", time.monotonic())
                break
            else:  # CLOSING, CLOSED, ERROR: the connection ended without a close frame
                code = self.ws.close_code
                self.closed = Closed(code, "", time.monotonic())
                break
        self._changed.set()

    def _file(self, frame: Any) -> None:
        self.frames.append(frame)
        self.arrivals.append(time.monotonic())
        items = frame if isinstance(frame, list) else [frame]
        for item in items:
            if not isinstance(item, dict):
                continue
            if "method" in item and "id" not in item:
                self.notifications.append(item)
                self.notification_arrivals.append(self.arrivals[-1])
            elif "id" in item and ("result" in item or "error" in item):
                key = _id_key(item["id"])
                if item["id"] is None:
                    self.null_id_answers.append(item)
                elif key in self.answers:
                    self.duplicate_answers.append(item)
                else:
                    self.answers[key] = item
        self._changed.set()

    async def wait_for(
        self, condition: Callable[[], bool], within: float = DEFAULT_WAIT, what: str = ""
    ) -> None:
        """Wait until ``condition()`` holds (it is checked after every frame)."""
        deadline = time.monotonic() + within
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"not within {within}s: {what or condition}; closed={self.closed}, "
                    f"last frames: {self.frames[-5:]!r:.2000}"
                )
            if self.closed is not None and self._reader.done():
                # Nothing more will arrive: one last check, then fail.
                if condition():
                    return
                raise AssertionError(
                    f"socket closed ({self.closed}) before: {what or condition}; "
                    f"last frames: {self.frames[-5:]!r:.2000}"
                )
            await self._next_change(remaining)

    async def _next_change(self, within: float) -> None:
        """Return when something arrives (or the socket ends), or after ``within``."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=within)

    async def wait_closed(self, within: float = DEFAULT_WAIT) -> Closed:
        """Wait for the server to end the socket; return how it ended."""
        deadline = time.monotonic() + within
        while self.closed is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the socket is still open after {within}s")
            await self._next_change(remaining)
        return self.closed

    # --- sending ---------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def request(self, method: str, params: Any = None, *, id: Any = None) -> dict[str, Any]:
        """A request object with ``id`` (a fresh one unless given)."""
        request: dict[str, Any] = {
            "jsonrpc": "2.0",
            "method": method,
            "id": self.next_id() if id is None else id,
        }
        if params is not None:
            request["params"] = params
        return request

    async def send(self, payload: Any) -> None:
        """Send one text frame: a str as it is, anything else as JSON."""
        await self.ws.send_str(payload if isinstance(payload, str) else json.dumps(payload))

    async def answer(self, id: Any, within: float = DEFAULT_WAIT) -> dict[str, Any]:
        """Wait for the answer with ``id``; return it."""
        key = _id_key(id)
        await self.wait_for(lambda: key in self.answers, within, f"the answer to id {id!r}")
        answer: dict[str, Any] = self.answers[key]
        return answer

    async def call(
        self, method: str, params: Any = None, *, within: float = DEFAULT_WAIT
    ) -> dict[str, Any]:
        """Send one request and return its answer (result or error)."""
        request = self.request(method, params)
        await self.send(request)
        return await self.answer(request["id"], within)

    async def result(self, method: str, params: Any = None) -> Any:
        """Send one request and return its result (failing the test on an error)."""
        answer = await self.call(method, params)
        assert "error" not in answer, answer
        return answer["result"]

    async def subscribe(self, **params: Any) -> str:
        subscription = await self.result("purchase.subscribe", params)
        assert isinstance(subscription, str), subscription
        return subscription

    # --- notifications ---------------------------------------------------------------

    def updates(self, subscription: str | None = None) -> list[dict[str, Any]]:
        """The ``result`` of every ``purchase.updated`` so far (of ``subscription`` if given)."""
        return [
            n["params"]["result"]
            for n in self.notifications
            if n.get("method") == "purchase.updated"
            and (subscription is None or n["params"]["subscription"] == subscription)
        ]

    def seqs(self, subscription: str | None = None) -> list[int]:
        return [update["seq"] for update in self.updates(subscription)]

    async def updates_at_least(
        self, count: int, subscription: str | None = None, within: float = DEFAULT_WAIT
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` updates (of ``subscription``) arrived; return them all."""
        await self.wait_for(
            lambda: len(self.updates(subscription)) >= count,
            within,
            f"{count} purchase.updated notifications (have {len(self.updates(subscription))})",
        )
        return self.updates(subscription)

    async def update_with_seq(
        self, seq: int, subscription: str | None = None, within: float = DEFAULT_WAIT
    ) -> list[dict[str, Any]]:
        """Wait until the update of event ``seq`` arrived; return every update so far."""
        await self.wait_for(
            lambda: seq in self.seqs(subscription), within, f"the update of seq {seq}"
        )
        return self.updates(subscription)


def _id_key(id: Any) -> str:
    # 1 and 1.0 and True are different ids on the wire; JSON text keeps them apart.
    return json.dumps(id)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- a raw peer (RFC 6455 by hand) ------------------------------------------------------

OPCODE_TEXT = 0x1
TCP_ESTABLISHED = 1  # tcpi_state (include/net/tcp_states.h)
OPCODE_CLOSE = 0x8


def upgrade_request(port: int, headers: Mapping[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /rpc HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def masked_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """One final client frame (clients must mask what they send)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return header + mask + masked


def read_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split server frames (unmasked) off ``data``: the whole frames, and what is left."""
    frames = []
    while len(data) >= 2:
        opcode = data[0] & 0x0F
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            if len(data) < 4:
                break
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            if len(data) < 10:
                break
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames, data


class RawPeer:
    """A WebSocket peer on a plain non-blocking socket: upgrade, send frames, read on demand.

    ``receive_buffer`` shrinks the socket's receive buffer before connecting, so that a
    peer that does not read pushes back on the server soon.
    """

    def __init__(self, port: int, *, receive_buffer: int | None = None) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setblocking(False)
        self.pending = b""

    async def upgrade(self, headers: Mapping[str, str] | None = None) -> bytes:
        """Connect and upgrade; return the response head (status line and headers)."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        await loop.sock_sendall(self.sock, upgrade_request(self.port, headers))
        received = b""
        async with asyncio.timeout(DEFAULT_WAIT):
            while b"\r\n\r\n" not in received:
                chunk = await loop.sock_recv(self.sock, 4096)
                if not chunk:
                    break
                received += chunk
        head, _, self.pending = received.partition(b"\r\n\r\n")
        return head

    async def send_text(self, text: str) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, masked_frame(text.encode()))

    async def read_until_closed(self, within: float) -> tuple[list[tuple[int, bytes]], bool]:
        """Read everything until the server ends the connection or ``within`` passes.

        Returns the frames read and whether the connection ended (EOF, reset, or a close
        frame) within the time.
        """
        loop = asyncio.get_running_loop()
        data = self.pending
        ended = False
        try:
            async with asyncio.timeout(within):
                while True:
                    try:
                        chunk = await loop.sock_recv(self.sock, 1 << 16)
                    except ConnectionResetError:
                        ended = True
                        break
                    if not chunk:
                        ended = True
                        break
                    data += chunk
        except TimeoutError:
            pass
        frames, self.pending = read_frames(data)
        ended = ended or any(opcode == OPCODE_CLOSE for opcode, _ in frames)
        return frames, ended

    def connected(self) -> bool:
        """Whether the TCP connection is still established as far as this end knows,
        read from the kernel (TCP_INFO) without reading any data: a FIN or a reset from
        the server ends it even while unread frames wait in the receive buffer."""
        state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        return state == TCP_ESTABLISHED

    def close(self) -> None:
        self.sock.close()


def close_code_of(frames: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    """The code and reason of the first close frame among ``frames`` (None: none)."""
    for opcode, payload in frames:
        if opcode == OPCODE_CLOSE and len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            return code, payload[2:].decode(errors="replace")
    return None
