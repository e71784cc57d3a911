"""One batch request's reads of purchases by id, coalesced into one statement per moment.

A batch of 50 ``purchase.get`` calls would otherwise run 50 statements, each with its
own checkout of a pooled connection and, on SQLite, its own trip to the driver's
thread. A batch's items run concurrently in lanes (``envelope.answer``); the lookups its
lanes make before the event loop comes round again are collected here and read with
one ``SELECT … WHERE purchase_id IN (…)`` per owner scope, then each lookup gets its own
answer (a missing purchase, or someone else's, is still that call's NotFound).

Reading them together is no weaker than reading them one by one: a read unit of work
runs without a transaction, each statement reading its own snapshot
(``unit_of_work``), and here the lookups share one. Lookups inside a write unit of work
never come here: they must see that transaction's own writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from rpc_server.domain.records import Purchase

# Reads the purchases among ``ids`` (only ``owner_id``'s unless None) in a read unit of
# work of its own; answers them by id.
ReadPurchases = Callable[[Sequence[str], int | None], Awaitable[dict[str, Purchase]]]


class PurchaseLookups:
    """Collects ``get`` calls made at the same moment; answers them from one read."""

    def __init__(self, read: ReadPurchases):
        self._read = read
        # Waiting lookups by owner scope: (purchase_id, its future), in call order.
        self._waiting: dict[int | None, list[tuple[str, asyncio.Future[Purchase | None]]]] = {}
        self._reads: set[asyncio.Task[None]] = set()  # running reads (kept referenced)

    async def get(self, purchase_id: str, owner_id: int | None) -> Purchase | None:
        """The purchase, only if owned by ``owner_id`` (None: any owner); else None."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            # After the callbacks ready now: the other lanes' lookups come in first.
            loop.call_soon(self._start_reads)
        future: asyncio.Future[Purchase | None] = loop.create_future()
        self._waiting.setdefault(owner_id, []).append((purchase_id, future))
        # A lookup cancelled while it waits (its call timed out) cancels only its own
        # future: the read goes on for the others.
        return await future

    def _start_reads(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for owner_id, lookups in waiting.items():
            read = asyncio.ensure_future(self._answer(owner_id, lookups))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    async def _answer(
        self, owner_id: int | None, lookups: list[tuple[str, asyncio.Future[Purchase | None]]]
    ) -> None:
        ids = list(dict.fromkeys(id_ for id_, future in lookups if not future.done()))
        if not ids:
            return  # every one of them gave up waiting
        try:
            found = await self._read(ids, owner_id)
        except Exception as error:  # each lookup's call answers it (-32000 and such)
            for _, future in lookups:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:  # cancelled (the server is stopping): so are the lookups
            for _, future in lookups:
                future.cancel()
            raise
        for id_, future in lookups:
            if not future.done():
                future.set_result(found.get(id_))
