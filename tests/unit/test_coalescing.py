"""PurchaseLookups: lookups made at the same moment are answered from one read."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from rpc_server.db.coalescing import PurchaseLookups


class Reads:
    """A fake read: records each call; answers from ``rows`` (id -> (owner, value))."""

    def __init__(self, rows: dict[str, tuple[int, Any]]):
        self.rows = rows
        self.calls: list[tuple[list[str], int | None]] = []
        self.error: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, ids: Sequence[str], owner_id: int | None) -> dict[str, Any]:
        self.calls.append((list(ids), owner_id))
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return {
            id_: value
            for id_, (owner, value) in self.rows.items()
            if id_ in ids and owner_id in (None, owner)
        }


ROWS = {"p1": (1, "alice's p1"), "p2": (1, "alice's p2"), "p3": (2, "bob's p3")}


async def test_concurrent_lookups_are_one_read_and_each_gets_its_own_answer() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    answers = await asyncio.gather(
        lookups.get("p1", 1), lookups.get("p2", 1), lookups.get("p3", 1), lookups.get("nope", 1)
    )
    assert answers == ["alice's p1", "alice's p2", None, None]  # bob's p3 is not alice's
    assert reads.calls == [(["p1", "p2", "p3", "nope"], 1)]


async def test_each_owner_scope_is_its_own_read() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    answers = await asyncio.gather(
        lookups.get("p3", 1), lookups.get("p3", 2), lookups.get("p3", None)
    )
    assert answers == [None, "bob's p3", "bob's p3"]
    assert sorted(reads.calls, key=str) == sorted(
        [(["p3"], 1), (["p3"], 2), (["p3"], None)], key=str
    )


async def test_the_same_id_twice_is_read_once_and_answered_twice() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    assert await asyncio.gather(lookups.get("p1", 1), lookups.get("p1", 1)) == [
        "alice's p1",
        "alice's p1",
    ]
    assert reads.calls == [(["p1"], 1)]


async def test_lookups_one_after_another_are_separate_reads() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    assert await lookups.get("p1", 1) == "alice's p1"
    assert await lookups.get("p2", 1) == "alice's p2"
    assert reads.calls == [(["p1"], 1), (["p2"], 1)]


async def test_a_failed_read_fails_every_lookup_in_it() -> None:
    reads = Reads(ROWS)
    reads.error = ConnectionError("database gone")
    lookups = PurchaseLookups(reads)
    results = await asyncio.gather(
        lookups.get("p1", 1), lookups.get("p2", 1), return_exceptions=True
    )
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    reads.error = None
    assert await lookups.get("p1", 1) == "alice's p1"  # the next moment reads afresh


async def test_a_cancelled_lookup_leaves_the_others_answered() -> None:
    reads = Reads(ROWS)
    reads.gate.clear()  # the read waits until let go
    lookups = PurchaseLookups(reads)
    quitter = asyncio.ensure_future(lookups.get("p1", 1))
    stayer = asyncio.ensure_future(lookups.get("p2", 1))
    for _ in range(5):  # time for the read to start (and wait at the gate)
        await asyncio.sleep(0)
    assert reads.calls == [(["p1", "p2"], 1)]
    quitter.cancel()  # its call timed out
    reads.gate.set()
    assert await stayer == "alice's p2"
    with pytest.raises(asyncio.CancelledError):
        await quitter


async def test_lookups_all_cancelled_before_the_read_starts_read_nothing() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    waiting = [asyncio.ensure_future(lookups.get(id_, 1)) for id_ in ("p1", "p2")]
    await asyncio.sleep(0)  # both are waiting; the read is scheduled, not started
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for _ in range(5):  # time for the scheduled read to start and look
        await asyncio.sleep(0)
    assert reads.calls == []
