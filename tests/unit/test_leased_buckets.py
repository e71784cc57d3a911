"""A busy caller's next calls taken ahead (rpc_server.jsonrpc.buckets.LeasedBuckets), over
in-memory store buckets that record what they are asked, with a clock that only moves
when told to: who goes to the store and for how much, what a lease holds and for how long,
and that nothing is ever granted that the store did not give."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc_server.jsonrpc.buckets import (
    CoalescedBuckets,
    Grant,
    LeasedBuckets,
    Limit,
    MemoryBuckets,
)
from tests.unit.test_rate_limit import Clock

KEY = "user:1"


@dataclasses.dataclass
class Taken:
    key: str
    asked: int
    granted: int


class RecordingStore:
    """Exact buckets (``MemoryBuckets``) that record each take: what was asked and granted."""

    def __init__(self, clock: Clock) -> None:
        self.memory = MemoryBuckets(clock=clock)
        self.takes: list[Taken] = []
        self.fail: Exception | None = None

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        if self.fail is not None:
            raise self.fail
        grant = await self.memory.take(key, calls, limit)
        self.takes.append(Taken(key, calls, grant.granted))
        return grant

    def asked(self) -> list[int]:
        return [taken.asked for taken in self.takes]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> RecordingStore:
    return RecordingStore(clock)


async def test_a_caller_whose_requests_are_further_apart_than_the_window_never_takes_ahead(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=1.0, burst=100)
    for _ in range(5):
        assert (await buckets.take(KEY, 2, limit)).granted == 2
        assert buckets.held(KEY) == 0
        clock.now += 0.25  # more than two windows: the last window saw nothing
    assert store.asked() == [2] * 5


async def test_a_busy_caller_takes_ahead_what_it_asked_in_the_last_window_up_to_a_tenth(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=1.0, burst=100)  # a tenth: 10 calls
    grants = [await buckets.take(KEY, 1, limit) for _ in range(40)]
    assert [g.granted for g in grants] == [1] * 40
    # Each take that goes to the store asks for its own call and for the calls asked
    # before it in the window (0, 1, 3, 7, then the cap of 10); the others are granted
    # here from what was taken ahead.
    assert store.asked() == [1, 2, 4, 8, 11, 11, 11]
    assert sum(store.asked()) == 40 + buckets.held(KEY)
    # The store's bucket and this process's lease together: what taking them one by one
    # from the store would have left.
    assert grants[-1].tokens_left == 100 - 40


async def test_the_next_window_asks_ahead_what_the_last_one_asked(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=1.0, burst=1000)  # a tenth: 100 calls
    for _ in range(6):
        await buckets.take(KEY, 1, limit)
    assert store.asked() == [1, 2, 4]  # and one call held
    clock.now += 0.1  # a new window: the last one asked 6 calls
    assert (await buckets.take(KEY, 1, limit)).granted == 1  # the call held
    await buckets.take(KEY, 1, limit)
    assert store.asked()[-1] == 1 + 6 + 1  # its call, the last window's 6, this one's 1
    assert buckets.held(KEY) == 7
    assert (await buckets.take(KEY, 7, limit)).granted == 7  # all held: no statement
    assert len(store.takes) == 4
    clock.now += 0.25  # two windows with nothing in them: no demand is remembered
    await buckets.take(KEY, 1, limit)
    assert store.asked()[-1] == 1
    assert buckets.held(KEY) == 0


async def test_what_a_lease_holds_is_dropped_after_hold_seconds(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, hold=1.0, clock=clock)
    limit = Limit(rate=0.001, burst=100)  # no refill to speak of
    for _ in range(4):
        await buckets.take(KEY, 1, limit)
    assert buckets.held(KEY) == 3  # the fourth call asked 1 + 3 ahead
    clock.now += 0.999
    assert buckets.held(KEY) == 3
    clock.now += 0.001
    assert buckets.held(KEY) == 0
    asked_before = len(store.takes)
    grant = await buckets.take(KEY, 1, limit)
    assert grant.granted == 1
    assert len(store.takes) == asked_before + 1, "an expired lease grants nothing"
    # The three dropped calls stay taken from the store's bucket: 100 - (1+2+4+1).
    assert grant.tokens_left == pytest.approx(92, abs=0.01)


async def test_a_limit_whose_tenth_is_under_one_call_is_never_leased(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=0.5, burst=9)
    grants = [(await buckets.take(KEY, 1, limit)).granted for _ in range(12)]
    assert grants == [1] * 9 + [0] * 3
    assert store.asked() == [1] * 12
    assert buckets.held(KEY) == 0


async def test_a_call_is_refused_only_when_the_store_and_the_lease_together_cannot_cover_it(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=0.001, burst=20)  # a tenth: 2 calls
    granted = [(await buckets.take(KEY, 1, limit)).granted for _ in range(20)]
    assert granted == [1] * 20, "the whole burst, none of it stranded in the lease"
    refused = await buckets.take(KEY, 3, limit)
    assert refused.granted == 0
    assert refused.tokens_left == pytest.approx(0.0, abs=0.01)
    assert limit.retry_after(refused.tokens_left, 3) > 2000  # the store's bucket decides


async def test_while_one_take_asks_ahead_the_takes_made_with_it_ask_only_for_their_own(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(CoalescedBuckets(store), clock=clock)
    limit = Limit(rate=1.0, burst=100)
    for _ in range(3):
        await buckets.take(KEY, 1, limit)
    assert store.asked() == [1, 2]
    grants = await asyncio.gather(*(buckets.take(KEY, 1, limit) for _ in range(4)))
    # One statement: the first asks 1 + the 3 calls before it, the others 1 each.
    assert store.asked() == [1, 2, 4 + 1 + 1 + 1]
    assert [g.granted for g in grants] == [1] * 4
    assert buckets.held(KEY) == 3


async def test_a_take_answered_with_one_asking_ahead_may_use_what_that_one_took_ahead(
    clock: Clock, store: RecordingStore
) -> None:
    """The takes of one moment share a statement, the grant given out in their order: the
    one asking ahead may get its calls ahead before a later one gets its own. That later
    one then takes them from the lease rather than being refused."""
    buckets = LeasedBuckets(CoalescedBuckets(store), clock=clock)
    limit = Limit(rate=0.001, burst=100)  # a tenth: 10 calls
    for _ in range(3):
        await buckets.take(KEY, 1, limit)
    await store.memory.take(KEY, 94, limit)  # other processes took all but 3 calls
    grants = await asyncio.gather(*(buckets.take(KEY, 1, limit) for _ in range(3)))
    # One statement: 1 + 3 ahead, then 1 and 1; the bucket held 3, all to the first.
    assert store.asked()[-1] == 4 + 1 + 1
    assert [g.granted for g in grants] == [1, 1, 1]
    assert buckets.held(KEY) == 0
    assert (await buckets.take(KEY, 1, limit)).granted == 0  # now it is empty


async def test_a_failed_take_keeps_what_the_caller_held_and_raises(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, clock=clock)
    limit = Limit(rate=1.0, burst=100)
    for _ in range(4):
        await buckets.take(KEY, 1, limit)
    assert buckets.held(KEY) == 3
    store.fail = ConnectionRefusedError()
    with pytest.raises(ConnectionRefusedError):
        await buckets.take(KEY, 5, limit)
    assert buckets.held(KEY) == 3
    store.fail = None
    assert (await buckets.take(KEY, 3, limit)).granted == 3
    assert store.asked() == [1, 2, 4], "granted from the lease, no statement"


async def test_callers_are_leased_apart_and_the_least_recent_forgotten_beyond_max_keys(
    clock: Clock, store: RecordingStore
) -> None:
    buckets = LeasedBuckets(store, max_keys=2, clock=clock)
    limit = Limit(rate=1.0, burst=100)
    for key in ("user:1", "user:2", "user:1", "user:2", "user:3"):
        await buckets.take(key, 1, limit)
    assert [buckets.held(k) for k in ("user:1", "user:2", "user:3")] == [0, 1, 0]
    assert [t.key for t in store.takes] == ["user:1", "user:2", "user:1", "user:2", "user:3"]
    await buckets.take("user:1", 1, limit)  # forgotten: no demand remembered, no lease
    assert store.takes[-1] == Taken("user:1", 1, 1)


STEPS = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.01, 0.05, 0.12, 0.6, 1.5]),  # the clock moves on
        st.integers(0, 1),  # which process takes
        st.sampled_from(["user:1", "ip:198.51.100.7"]),
        st.integers(1, 6),  # calls
    ),
    max_size=120,
)


@settings(deadline=None, max_examples=150)
@given(steps=STEPS, burst=st.integers(1, 60), rate=st.sampled_from([0.5, 5.0, 50.0]))
def test_two_processes_never_grant_what_the_shared_bucket_did_not_give(
    steps: list[tuple[float, int, str, int]], burst: int, rate: float
) -> None:
    asyncio.run(_two_processes(steps, burst, rate))


async def _two_processes(steps: list[tuple[float, int, str, int]], burst: int, rate: float) -> None:
    clock = Clock()
    store = RecordingStore(clock)
    processes = [LeasedBuckets(store, clock=clock), LeasedBuckets(store, clock=clock)]
    limit = Limit(rate=rate, burst=burst)
    # Per key: (time, calls granted so far, calls held by both processes) before each step.
    history: dict[str, list[tuple[float, int, int]]] = {}
    granted: dict[str, int] = {}
    for move, process, key, calls in steps:
        clock.now += move
        held_before = sum(p.held(key) for p in processes)
        history.setdefault(key, []).append((clock.now, granted.get(key, 0), held_before))
        before = len(store.takes)
        grant = await processes[process].take(key, calls, limit)
        assert 0 <= grant.granted <= calls
        granted[key] = granted.get(key, 0) + grant.granted
        if grant.granted < calls:
            # Refused only after asking the store, which could not cover the rest.
            assert len(store.takes) == before + 1
            taken = store.takes[-1]
            assert taken.granted < taken.asked
            assert processes[process].held(key) == 0
        # Never more than the shared bucket gave (and what was given is granted or held).
        given_by_store = sum(t.granted for t in store.takes if t.key == key)
        assert granted[key] + sum(p.held(key) for p in processes) <= given_by_store
        # Over any stretch of time: one burst, the refill, and what the processes held
        # (taken ahead) when it began.
        for then, granted_then, held_then in history[key]:
            window = granted[key] - granted_then
            assert window <= burst + rate * (clock.now - then) + held_then + 1e-6
        # What a process holds is at most a tenth of the burst (one take's worth ahead).
        assert all(p.held(key) <= max(0, burst // 10) for p in processes)
