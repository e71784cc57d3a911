"""The requests a server process is handling, counted so that its shutdown can wait for them.

Where it sits: ``rpc_server.server.serving`` appends ``InFlight.middleware`` to the app's
middlewares; at shutdown (SIGTERM) its drain sets ``closing`` and waits for ``settled``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler


class InFlight:
    """Counts requests being handled, so shutdown can wait until there are none."""

    # After the last call ends, how long a keep-alive connection gets to deliver a request
    # its client had already written (it is still in the socket, not yet counted).
    GRACE_SECONDS = 0.2

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # A WebSocket lives as long as its client wants: not a call the drain waits
            # for. It is closed with 1001 after the drain (rpc_server.live.transport).
            return await handler(request)
        self.count += 1
        self._idle.clear()
        try:
            response = await handler(request)
            if self.closing:
                # "Connection: close": the client sends nothing more on this connection.
                response.force_close()
            return response
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def settled(self) -> None:
        """Return once no call has been running for ``GRACE_SECONDS``."""
        while True:
            await self._idle.wait()
            await asyncio.sleep(self.GRACE_SECONDS)
            if self.count == 0:
                return
