"""One WebSocket connection: who it is, its subscriptions, and its bounded send queue.

Where it sits: ``transport`` makes one per upgraded ``GET /rpc`` and hands it each text
frame to answer (``answer``); the feed hands it the updates of its subscriptions
(``send_update``). Everything it sends goes through one queue, written out by one task,
so a subscription's first notification always follows the answer that named it.

The queue is bounded (``RPC_SERVER_WS_SEND_QUEUE`` messages): notifications that find it
full mean the peer is not reading as fast as updates come, and the connection is closed
with 1008 ("too slow"), its subscriptions ended; the client reconnects and resubscribes
with ``since``, losing nothing. Answers to calls are never refused by the bound: there are
at most ``MAX_MESSAGES_IN_FLIGHT`` calls running per connection, and reading stops while
they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientError, WSCloseCode, WSMsgType, web

from rpc_server.domain import services
from rpc_server.domain.errors import Conflict
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import Actor, UpdateScope
from rpc_server.jsonrpc.envelope import invalid_request
from rpc_server.jsonrpc.json_codec import dumps
from rpc_server.live import messages
from rpc_server.live.feed import Delivery, EventFeed, Subscription

log = logging.getLogger("rpc_server.live")

# Messages (text frames) of one connection answered at the same time; the next frame is
# read when one of them is done.
MAX_MESSAGES_IN_FLIGHT = 8
# How long closing may wait for a peer that does not read (then the socket is dropped).
CLOSE_TIMEOUT_SECONDS = 2.0

# Close codes (RFC 6455, 7.4.1).
POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001


class LiveConnection:
    """One WebSocket connection's state: its caller, subscriptions and send queue."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        feed: EventFeed,
        uow_factory: UnitOfWorkFactory,
        *,
        max_subscriptions: int,
        send_queue: int,
        token_recheck: float,
    ):
        self.ws = ws
        self.request = request
        self.feed = feed
        self.uow = uow_factory
        self.max_subscriptions = max_subscriptions
        self.send_limit = send_queue
        self.token_recheck = token_recheck
        self.token: str | None = None
        self.actor: Actor | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.closing = False
        # Shutting down: frames that arrive are no longer answered.
        self.stopping = False
        self.close_code: int | None = None
        self._queue: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()  # set while the queue is empty and written out
        self._drained.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(MAX_MESSAGES_IN_FLIGHT)
        self._writer = self._spawn(self._write_forever(), "live-writer")
        self._guard: asyncio.Task[None] | None = None

    # --- who is calling -------------------------------------------------------------

    def authenticated(self, token: str, actor: Actor) -> None:
        """The connection now acts for ``actor`` (header or ``rpc.authenticate``).

        Raises Conflict when it already acts for someone: one caller per connection.
        """
        if self.actor is not None:
            raise Conflict(
                "Conflict: this connection is already authenticated; open another one to "
                "act for another token"
            )
        self.token, self.actor = token, actor
        self._guard = self._spawn(self._keep_checking_token(), "live-token-check")

    async def _keep_checking_token(self) -> None:
        """Close the connection once its token no longer authenticates (revoked or
        expired), checked every ``token_recheck`` seconds and at its expiry."""
        while not self.closing:
            wait = self.token_recheck
            assert self.actor is not None and self.token is not None
            expires = self.actor.token_expires_at
            if expires is not None:
                left = (expires - services.utcnow()).total_seconds()
                wait = max(0.0, min(wait, left + 0.001))
            await asyncio.sleep(wait)
            try:
                actor = await services.authenticate(self.uow, self.token)
            except Exception as exc:  # the database is unavailable: check again later
                log.info("could not re-check a WebSocket's token: %s", type(exc).__name__)
                continue
            if actor is None:
                log.info("closing a WebSocket: its token was revoked or expired")
                self.close(POLICY_VIOLATION, "token revoked or expired")
                return
            self.actor = actor

    # --- subscriptions (called by the methods, through ``MessageScope``) ------------

    def subscribe(self, actor: Actor, scope: UpdateScope, since: int | None) -> Subscription:
        """Add a held subscription (``EventFeed.add``); raises Conflict past the cap.

        Never awaits: the cap's check and the addition are one step, whatever runs
        concurrently (the items of a batch).
        """
        if len(self.subscriptions) >= self.max_subscriptions:
            raise Conflict(
                f"Conflict: a connection may hold at most {self.max_subscriptions} "
                "subscriptions; unsubscribe from one first",
                {"limit": self.max_subscriptions},
            )
        subscription = Subscription(self, actor, scope, cursor=0, since=since)
        self.feed.add(subscription)
        self.subscriptions[subscription.subscription_id] = subscription
        return subscription

    def unsubscribe(self, subscription_id: str) -> bool:
        subscription = self.subscriptions.pop(subscription_id, None)
        if subscription is None:
            return False
        self.feed.remove(subscription)
        return True

    # --- what the feed calls (``feed.Subscriber``) ------------------------------------

    def send_update(self, subscription: Subscription, update: Delivery) -> None:
        assert self.actor is not None
        self._notify(messages.updated(subscription.subscription_id, update, subscription.actor))

    def send_resync(self, subscription: Subscription, seq: int, reason: str) -> None:
        self._notify(messages.resync(subscription.subscription_id, seq, reason))

    def fell_behind(self, subscription: Subscription | None = None) -> None:
        log.info("closing a WebSocket from %s: it does not read its updates", self.request.remote)
        self.close(
            POLICY_VIOLATION,
            f"too slow: {self.send_limit} messages unread; reconnect and resubscribe with since",
        )

    def _notify(self, message: bytes) -> None:
        if self.closing:
            return
        if len(self._queue) >= self.send_limit:
            self.fell_behind()
            return
        self.send(message)

    # --- sending ----------------------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Queue one text frame (an answer: not bounded, see the module docstring)."""
        if self.closing:
            return
        self._queue.append(message)
        self._drained.clear()
        self._ready.set()

    async def _write_forever(self) -> None:
        queue, ws = self._queue, self.ws
        while True:
            await self._ready.wait()
            self._ready.clear()
            try:
                while queue:
                    await ws.send_frame(queue.popleft(), WSMsgType.TEXT)
            except (ConnectionError, ClientError):
                # The peer is gone: nothing more can be sent; the reader sees the close.
                self.closing = True
                self.end_subscriptions()
                queue.clear()
                self._drained.set()
                return
            self._drained.set()

    # --- receiving --------------------------------------------------------------------

    async def receive(self, answer: Callable[[bytes], Awaitable[None]]) -> None:
        """Read frames until the peer or the server closes; answer each text frame with
        ``answer`` (several at once, at most ``MAX_MESSAGES_IN_FLIGHT``)."""
        async for message in self.ws:
            if message.type == WSMsgType.TEXT or message.type == WSMsgType.BINARY:
                await self._slots.acquire()
                if self.closing or self.stopping:
                    self._slots.release()
                    if self.closing:
                        break
                    continue  # shutting down: no new call starts
                data = message.data
                body = data.encode() if isinstance(data, str) else data
                binary = message.type == WSMsgType.BINARY
                task = self._spawn(self._answer(answer, body, binary), "live-call")
                task.add_done_callback(lambda _: self._slots.release())
            elif message.type == WSMsgType.ERROR:
                break

    async def _answer(
        self, answer: Callable[[bytes], Awaitable[None]], body: bytes, binary: bool
    ) -> None:
        if binary:
            self.send(dumps(invalid_request("Send JSON-RPC messages as text frames.")))
            return
        await answer(body)

    # --- closing ----------------------------------------------------------------------

    def close(self, code: int, reason: str, *, flush: bool = False) -> asyncio.Task[None] | None:
        """End every subscription and close the socket with ``code`` (in a task, which is
        returned: the feed calls this while handing out an update). With ``flush``, what
        is queued is written first (within ``CLOSE_TIMEOUT_SECONDS``)."""
        if self.closing:
            return None
        self.closing, self.close_code = True, code
        self.end_subscriptions()
        return self._spawn(self._close(code, reason, flush), "live-close")

    def end_subscriptions(self) -> None:
        for subscription in self.subscriptions.values():
            self.feed.remove(subscription)
        self.subscriptions.clear()

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                if flush and not self._writer.done():
                    await self._drained.wait()
        except TimeoutError:
            pass
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                # A close frame's reason is at most 123 bytes (RFC 6455, 5.5).
                await self.ws.close(code=code, message=reason.encode()[:123])
        except (TimeoutError, ConnectionError):
            pass
        finally:
            # A peer that does not read leaves what we wrote (the close frame too) in
            # our buffer, and a graceful close would wait for it forever: drop it.
            transport = self.request.transport
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()

    async def going_away(self, budget: float) -> None:
        """The server is shutting down: answer the calls under way (within ``budget``
        seconds), write out what is queued, and close with 1001."""
        self.stopping = True
        calls = [task for task in self._tasks if task.get_name() == "live-call"]
        if calls:
            await asyncio.wait(calls, timeout=budget)
        closing = self.close(GOING_AWAY, "server shutting down", flush=True)
        if closing is not None:
            await asyncio.wait([closing], timeout=budget + CLOSE_TIMEOUT_SECONDS)

    async def finish(self, budget: float) -> None:
        """After the socket closed: end subscriptions, let answers under way finish
        within ``budget`` seconds, then cancel what is left."""
        self.closing = True
        self.end_subscriptions()
        running = [task for task in self._tasks if task is not asyncio.current_task()]
        calls = [t for t in running if t.get_name() == "live-call"]
        if calls:
            await asyncio.wait(calls, timeout=budget)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _spawn(self, coroutine: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
