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


# Reading ahead: the ids a batch's calls said they would look up (``expect``).


def answered_at_once(lookup: Any) -> Any:
    """The answer of a lookup coroutine that must not wait for anything."""
    with pytest.raises(StopIteration) as returned:
        lookup.send(None)
    return returned.value.value


async def test_the_first_expected_lookup_reads_every_expected_id_at_once() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    for id_ in ("p1", "p2", "p3", "nope"):
        lookups.expect(id_)
    assert reads.calls == []  # noting reads nothing
    assert await lookups.get("p2", 1) == "alice's p2"
    assert reads.calls == [(["p1", "p2", "p3", "nope"], 1)]
    # The others are answered from that read, without waiting for anything.
    assert answered_at_once(lookups.get("p1", 1)) == "alice's p1"
    assert answered_at_once(lookups.get("p3", 1)) is None  # bob's: not alice's
    assert answered_at_once(lookups.get("nope", 1)) is None
    assert answered_at_once(lookups.get("p1", 1)) == "alice's p1"  # asked twice
    assert len(reads.calls) == 1


async def test_lookups_waiting_for_the_read_ahead_share_it() -> None:
    reads = Reads(ROWS)
    reads.gate.clear()
    lookups = PurchaseLookups(reads)
    lookups.expect("p1")
    lookups.expect("p2")
    waiting = [asyncio.ensure_future(lookups.get(id_, 1)) for id_ in ("p1", "p2", "p1")]
    for _ in range(5):
        await asyncio.sleep(0)
    reads.gate.set()
    assert await asyncio.gather(*waiting) == ["alice's p1", "alice's p2", "alice's p1"]
    assert reads.calls == [(["p1", "p2"], 1)]


async def test_each_owner_scope_reads_ahead_on_its_own() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    lookups.expect("p3")
    assert await lookups.get("p3", 1) is None
    assert await lookups.get("p3", 2) == "bob's p3"
    assert await lookups.get("p3", None) == "bob's p3"
    assert reads.calls == [(["p3"], 1), (["p3"], 2), (["p3"], None)]


async def test_an_id_nobody_expected_is_read_the_coalesced_way() -> None:
    reads = Reads(ROWS)
    lookups = PurchaseLookups(reads)
    lookups.expect("p1")
    assert await asyncio.gather(lookups.get("p1", 1), lookups.get("p2", 1)) == [
        "alice's p1",
        "alice's p2",
    ]
    assert sorted(reads.calls) == [(["p1"], 1), (["p2"], 1)]


async def test_after_a_write_begins_lookups_read_afresh() -> None:
    rows = dict(ROWS)
    reads = Reads(rows)
    lookups = PurchaseLookups(reads)
    lookups.expect("p1")
    assert await lookups.get("p1", 1) == "alice's p1"
    lookups.stop_reading_ahead()  # a call of the batch writes
    rows["p1"] = (1, "alice's p1, changed")
    assert await lookups.get("p1", 1) == "alice's p1, changed"
    assert reads.calls == [(["p1"], 1), (["p1"], 1)]


async def test_a_failed_read_ahead_fails_its_waiting_lookups_and_the_next_reads_afresh() -> None:
    reads = Reads(ROWS)
    reads.error = ConnectionError("database gone")
    lookups = PurchaseLookups(reads)
    lookups.expect("p1")
    lookups.expect("p2")
    results = await asyncio.gather(
        lookups.get("p1", 1), lookups.get("p2", 1), return_exceptions=True
    )
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    await asyncio.sleep(0)  # the failed read's callback has run
    reads.error = None
    assert await lookups.get("p2", 1) == "alice's p2"
    assert reads.calls == [(["p1", "p2"], 1), (["p1", "p2"], 1)]


async def test_a_lookup_cancelled_while_the_read_ahead_runs_leaves_it_to_the_others() -> None:
    reads = Reads(ROWS)
    reads.gate.clear()
    lookups = PurchaseLookups(reads)
    lookups.expect("p1")
    lookups.expect("p2")
    quitter = asyncio.ensure_future(lookups.get("p1", 1))
    stayer = asyncio.ensure_future(lookups.get("p2", 1))
    for _ in range(5):
        await asyncio.sleep(0)
    quitter.cancel()  # its call timed out
    reads.gate.set()
    assert await stayer == "alice's p2"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert answered_at_once(lookups.get("p1", 1)) == "alice's p1"  # the read went on
    assert len(reads.calls) == 1
