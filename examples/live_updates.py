"""Following purchases live from Python: JSON-RPC 2.0 over a WebSocket with aiohttp.

The server's endpoint also takes a WebSocket upgrade (``GET /rpc``): each text frame is one
JSON-RPC request, and after ``purchase.subscribe`` the server pushes one
``purchase.updated`` notification per state change of the purchases the token may see,
in ``seq`` order. This script connects with the bearer token in the upgrade request's
``Authorization`` header (aiohttp's ``session.ws_connect``), subscribes, prints each
notification, and, when the connection drops (a restart, a network cut, "too slow"),
reconnects and subscribes again with ``since`` = the last ``seq`` it printed: the server
replays what it missed, exactly once, then goes on live.

Start the server with demo data first (see the README), then, for example:

    python examples/live_updates.py                                  # all my purchases
    python examples/live_updates.py --purchase-id ID --until-state fulfilled
    python examples/live_updates.py --since 0 --count 5              # replay from the start

With ``--purchase-id`` and no ``--since`` it first reads the purchase's history
(``purchase.events``) and subscribes from its latest ``seq``, so a change made between
the two calls cannot be missed, and it stops at once if the purchase is already in the
``--until-state``. It stops after ``--count`` notifications or when a purchase (the one
given, or any) reaches ``--until-state``; otherwise it runs until interrupted. It exits 0
when it stopped as asked, 1 on a refusal (a bad token, an unknown purchase) or when
``--timeout`` seconds pass first.

Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

RPC_URL = os.environ.get("RPC_URL", "http://127.0.0.1:8080/rpc")
TOKEN = os.environ.get("TOKEN", "demo-alice")
STATES = ("pending", "fulfilled", "failed", "canceled")
# Close codes after which connecting again cannot help: 1008 with a reason starting
# "authentication" or "token" (the token is bad, revoked or expired). 1008 "too slow",
# 1001 (the server is going away) and a lost connection are worth a reconnect.
FATAL_CLOSE_REASONS = ("authentication", "token")
MAX_RECONNECT_DELAY = 10.0


class RpcError(Exception):
    """The server answered a call with a JSON-RPC error object."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(
            f"{method}: error {error.get('code')} {error.get('message')}"
            f" data={json.dumps(error.get('data'))}"
        )


class Disconnected(Exception):
    """The WebSocket closed; ``fatal`` when reconnecting cannot help."""

    def __init__(self, description: str, *, fatal: bool = False) -> None:
        super().__init__(description)
        self.fatal = fatal


@dataclass
class Follow:
    """What to follow, when to stop, and where to resume: ``last_seq`` survives reconnects."""

    purchase_id: str | None
    until_state: str | None
    count: int | None
    last_seq: int | None
    received: int = 0
    finished: bool = False

    def subscribe_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.purchase_id is not None:
            params["purchase_id"] = self.purchase_id
        if self.last_seq is not None:
            params["since"] = self.last_seq
        return params

    def reached(self, purchase_id: str, state: str) -> None:
        """Note a purchase seen in ``state``; finish if that is what we wait for."""
        wanted = self.purchase_id is None or purchase_id == self.purchase_id
        if self.until_state is not None and wanted and state == self.until_state:
            self.finished = True


def websocket_url(rpc_url: str) -> URL:
    """The same endpoint, as a WebSocket address: http -> ws, https -> wss."""
    url = URL(rpc_url)
    return url.with_scheme({"http": "ws", "https": "wss"}.get(url.scheme, url.scheme))


def say(line: str) -> None:
    print(line, flush=True)  # flushed: whoever reads a pipe sees each line as it happens


class LiveConnection:
    """One WebSocket to the endpoint. Calls send a request and read frames until its
    answer; notifications read meanwhile wait in ``unread`` for the caller."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.unread: list[Any] = []

    async def receive(self) -> Any:
        """The next text frame, parsed; raises ``Disconnected`` once the socket closes."""
        while True:
            message = await self.ws.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                return json.loads(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                reason = str(message.extra or "")
                fatal = message.data == 1008 and reason.startswith(FATAL_CLOSE_REASONS)
                raise Disconnected(f"closed by the server: {message.data} {reason}", fatal=fatal)
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise Disconnected(f"connection lost: {self.ws.exception() or 'closed'}")
            # The server sends text frames only; anything else is not for us.

    async def call(self, method: str, params: Any) -> Any:
        """Send one request; return its result or raise ``RpcError``."""
        request_id = next(self.ids)
        await self.ws.send_json({"jsonrpc": "2.0", "method": method, "params": params,
                                 "id": request_id})  # fmt: skip
        while True:
            frame = await self.receive()
            if isinstance(frame, dict) and "method" not in frame and frame.get("id") == request_id:
                if "error" in frame:
                    raise RpcError(method, frame["error"])
                return frame["result"]
            self.unread.append(frame)


def show(frame: Any, subscription: str, follow: Follow) -> None:
    """Print one notification of our subscription and remember its seq; skip the rest."""
    if not isinstance(frame, dict) or frame.get("method") is None:
        return
    params = frame.get("params") or {}
    if params.get("subscription") != subscription:
        return
    result = params["result"]
    if frame["method"] == "purchase.updated":
        event, purchase = result["event"], result["purchase"]
        say(
            f"#{result['seq']} {event['purchase_id']} {event['from_state']} -> "
            f"{event['to_state']} by {event['source']} ({event['evidence']}) "
            f"payment_ref={event['payment_ref']} now {purchase['state']}"
        )
        follow.last_seq = result["seq"]
        follow.received += 1
        follow.reached(event["purchase_id"], event["to_state"])
        if follow.count is not None and follow.received >= follow.count:
            follow.finished = True
    elif frame["method"] == "purchase.resync":
        # Too far behind to replay: the server skips to its latest seq. Whatever changed
        # meanwhile must be re-read (purchase.get / purchase.list); live from here on.
        say(
            f"resync: the events up to #{result['seq']} were not replayed "
            f"({result.get('reason')}); re-read the purchases with purchase.get or purchase.list"
        )
        follow.last_seq = result["seq"]


async def follow_once(session: aiohttp.ClientSession, rpc_url: str, follow: Follow) -> None:
    """One connection: subscribe (from ``follow.last_seq`` if known), print notifications
    until ``follow`` is finished. Raises ``Disconnected`` when the socket closes first."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.ws_connect(websocket_url(rpc_url), headers=headers, heartbeat=30) as ws:
        connection = LiveConnection(ws)
        if follow.last_seq is None and follow.purchase_id is not None:
            # Subscribing from the purchase's latest seq leaves no gap between reading its
            # state and the subscription taking effect.
            events = await connection.call("purchase.events", {"purchase_id": follow.purchase_id})
            if events:
                latest = events[-1]
                follow.last_seq = latest["seq"]
                say(f"purchase {follow.purchase_id} is {latest['to_state']} (#{latest['seq']})")
                follow.reached(follow.purchase_id, latest["to_state"])
                if follow.finished:
                    return
        params = follow.subscribe_params()
        subscription = await connection.call("purchase.subscribe", params)
        since = params.get("since", "now (live only)")
        say(
            f"subscribed: {subscription} to {follow.purchase_id or 'all purchases in scope'}"
            f" since {since}"
        )
        while not follow.finished:
            frame = connection.unread.pop(0) if connection.unread else await connection.receive()
            show(frame, subscription, follow)
        # Polite, not needed: closing the socket ends its subscriptions anyway.
        with contextlib.suppress(Disconnected, RpcError):
            await connection.call("purchase.unsubscribe", {"subscription": subscription})


async def follow_with_reconnects(rpc_url: str, follow: Follow) -> int:
    """Follow until finished, reconnecting after a drop with a growing delay; the exit code."""
    delay = 0.5
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                await follow_once(session, rpc_url, follow)
                return 0
            except RpcError as refused:
                say(f"refused: {refused}")
                return 1
            except aiohttp.WSServerHandshakeError as refused:
                if refused.status in (401, 403):  # a bad token: asking again will not help
                    say(f"refused: the upgrade answered HTTP {refused.status}")
                    return 1
                problem = f"the upgrade answered HTTP {refused.status}"
            except Disconnected as lost:
                if lost.fatal:
                    say(f"refused: {lost}")
                    return 1
                problem = str(lost)
            except aiohttp.ClientError as failure:  # refused, reset, DNS
                problem = f"cannot connect: {type(failure).__name__}: {failure}"
            resume = "live" if follow.last_seq is None else f"after #{follow.last_seq}"
            say(f"disconnected ({problem}); reconnecting in {delay:g} s, resuming {resume}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchase-id", help="follow this purchase only")
    parser.add_argument("--since", type=int, help="replay every event after this seq first (>= 0)")
    parser.add_argument("--until-state", choices=STATES, help="stop when a purchase gets here")
    parser.add_argument("--count", type=int, help="stop after this many notifications")
    parser.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    arguments = parser.parse_args(argv)
    if arguments.since is not None and arguments.since < 0:
        parser.error("--since must be >= 0")
    if arguments.count is not None and arguments.count < 1:
        parser.error("--count must be >= 1")
    return arguments


async def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    follow = Follow(
        purchase_id=arguments.purchase_id,
        until_state=arguments.until_state,
        count=arguments.count,
        last_seq=arguments.since,
    )
    try:
        async with asyncio.timeout(arguments.timeout):
            code = await follow_with_reconnects(RPC_URL, follow)
    except TimeoutError:
        say(f"timed out after {arguments.timeout:g} s without reaching the end asked for")
        return 1
    if code == 0:
        say(f"done: {follow.received} notification(s), last seq {follow.last_seq}")
    return code


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
