"""One batch request's reads of purchases by id: read ahead, or coalesced per moment.

A batch of 50 ``purchase.get`` calls would otherwise run 50 statements, each with its
own checkout of a pooled connection and, on SQLite, its own trip to the driver's
thread. Two ways bring that down to one or a few statements:

- **Read ahead.** Before a batch runs, the envelope tells each method able to say so
  what its valid calls will read (``RpcMethod.read_ahead``): ``purchase.get`` notes its
  purchase id here (``expect``). The first lookup of a noted id reads every noted id at
  once, with the caller's owner scope, and every later lookup of a noted id is answered
  from that read without waiting for another: the batch's calls then run straight
  through, not one suspension and wake-up each. Once a call of the batch begins to
  write, the ids read ahead are forgotten (``stop_reading_ahead``), so no lookup that
  starts after that write answers from a read made before it.
- **Coalesced.** Any other lookup (an id nobody noted, or after a write) waits for the
  lookups the batch's lanes make before the event loop comes round again; these are
  read with one ``SELECT … WHERE purchase_id IN (…)`` per owner scope.

Either way each lookup gets its own answer (a missing purchase, or someone else's, is
still that call's NotFound), and a read that fails fails the lookups waiting for it; the
next lookup reads afresh.

Reading them together is no weaker than reading them one by one: a read unit of work
runs without a transaction, each statement reading its own snapshot
(``unit_of_work``), and here the lookups share one. Lookups inside a write unit of work
never come here: they must see that transaction's own writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from rpc_server.domain.records import Purchase

# Reads the purchases among ``ids`` (only ``owner_id``'s unless None) in a read unit of
# work of its own; answers them by id.
ReadPurchases = Callable[[Sequence[str], int | None], Awaitable[dict[str, Purchase]]]


class PurchaseLookups:
    """Answers one batch's lookups of purchases by id from reads of several at once."""

    def __init__(self, read: ReadPurchases):
        self._read = read
        # Waiting lookups by owner scope: (purchase_id, its future), in call order.
        self._waiting: dict[int | None, list[tuple[str, asyncio.Future[Purchase | None]]]] = {}
        self._reads: set[asyncio.Task[Any]] = set()  # running reads (kept referenced)
        # Ids the batch's calls will look up (``expect``), in the order noted.
        self._expected: dict[str, None] = {}
        # The read of every expected id, by owner scope: started by the first lookup of
        # one, dropped if it fails (the next lookup then reads afresh).
        self._ahead: dict[int | None, asyncio.Task[dict[str, Purchase]]] = {}

    def expect(self, purchase_id: str) -> None:
        """Note that a call of the batch will look ``purchase_id`` up (read ahead)."""
        self._expected[purchase_id] = None

    def stop_reading_ahead(self) -> None:
        """A call of the batch writes: lookups from now on wait for a read of their own
        moment, never for one made before the write (a read already under way still
        answers the lookups that started before)."""
        self._expected.clear()
        self._ahead.clear()

    async def get(self, purchase_id: str, owner_id: int | None) -> Purchase | None:
        """The purchase, only if owned by ``owner_id`` (None: any owner); else None."""
        if purchase_id in self._expected:
            ahead = self._ahead.get(owner_id)
            if ahead is None:
                ahead = self._read_ahead(owner_id)
            if ahead.done():
                return ahead.result().get(purchase_id)
            # Shielded: a lookup cancelled while it waits (its call timed out) leaves the
            # read to the others.
            return (await asyncio.shield(ahead)).get(purchase_id)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            # After the callbacks ready now: the other lanes' lookups come in first.
            loop.call_soon(self._start_reads)
        future: asyncio.Future[Purchase | None] = loop.create_future()
        self._waiting.setdefault(owner_id, []).append((purchase_id, future))
        # A lookup cancelled while it waits (its call timed out) cancels only its own
        # future: the read goes on for the others.
        return await future

    def _read_ahead(self, owner_id: int | None) -> asyncio.Task[dict[str, Purchase]]:
        read = asyncio.ensure_future(self._read(list(self._expected), owner_id))
        self._ahead[owner_id] = read
        self._reads.add(read)

        def done(read: asyncio.Task[dict[str, Purchase]]) -> None:
            self._reads.discard(read)
            # A read that failed (its waiting lookups got the error) is not kept: the next
            # lookup reads afresh. ``exception()`` also marks the error as seen.
            if (read.cancelled() or read.exception() is not None) and (
                self._ahead.get(owner_id) is read
            ):
                del self._ahead[owner_id]

        read.add_done_callback(done)
        return read

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
