"""Who pays for a request's calls and what they cost (rpc_server.jsonrpc.rate_limit), on in-memory
buckets with a clock that only moves when told to; tokens are looked up in the fake
database, whose units of work are counted (one per token lookup)."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

import pytest

from rpc_server.domain.links import FrontendLinks
from rpc_server.jsonrpc.buckets import (
    CoalescedBuckets,
    FallbackBuckets,
    Grant,
    Limit,
    MemoryBuckets,
)
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.rate_limit import CALL_COSTS, RateLimits, cost_of
from rpc_server.jsonrpc.token_cache import ActorCache
from rpc_server.payment_signatures import PaymentSignatures
from tests.unit.conftest import FakeWorld

ATTACKER = "203.0.113.7"
NEIGHBOUR = "198.51.100.9"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Clock:
    return Clock()


@pytest.fixture
def actors() -> ActorCache:
    return ActorCache(5.0)


@pytest.fixture
def make_context(
    fake: FakeWorld, links: FrontendLinks, verifier: PaymentSignatures, actors: ActorCache
) -> Any:
    def make(token: str | None = None, client: str = ATTACKER, uow: Any = None) -> RpcContext:
        return RpcContext(
            uow=uow or fake.uow, links=links, payments=verifier, token=token, client=client,
            actors=actors,
        )  # fmt: skip

    return make


USER_LIMIT = Limit(1, 100)
ANONYMOUS_LIMIT = Limit(1, 5)


def limits(
    ticks: Clock,
    *,
    per_user: Limit | None = USER_LIMIT,
    anonymous: Limit | None = ANONYMOUS_LIMIT,
) -> RateLimits:
    buckets = MemoryBuckets(clock=ticks)
    return RateLimits(buckets, per_user=per_user, anonymous=anonymous, clock=ticks)


def lookups(fake: FakeWorld) -> int:
    return len(fake.uow.opened)  # authenticate opens one read unit of work per lookup


async def test_calls_without_a_token_are_limited_per_client_address(
    ticks: Clock, make_context: Any
) -> None:
    limiter = limits(ticks, anonymous=Limit(2, 3))
    assert await limiter.admit(make_context(), [1, 1, 1, 1]) == [None, None, None, 0.5]
    assert await limiter.admit(make_context(client=NEIGHBOUR), [1, 1]) == [None, None]
    ticks.now += 0.5  # one call refilled
    assert await limiter.admit(make_context(), [1, 1]) == [None, 0.5]


async def test_a_valid_token_pays_from_its_users_bucket_shared_by_the_users_tokens(
    ticks: Clock, make_context: Any, fake: FakeWorld
) -> None:
    limiter = limits(ticks, per_user=Limit(1, 4), anonymous=Limit(1, 1))
    first = fake.uow.add_token(fake.alice, "rpcs_alice-one")
    second = fake.uow.add_token(fake.alice, "rpcs_alice-two")
    assert await limiter.admit(make_context(first), [1]) == [None]
    assert await limiter.admit(make_context(), [1, 1]) == [None, 1.0]  # the address: empty
    # Alice's calls from that same address come out of her own bucket, not the address's.
    assert await limiter.admit(make_context(first), [1, 1]) == [None, None]
    assert await limiter.admit(make_context(second, client=NEIGHBOUR), [1, 1]) == [None, 1.0]
    bobs = fake.uow.add_token(fake.bob, "rpcs_bob")
    assert await limiter.admit(make_context(bobs, client=NEIGHBOUR), [1] * 4) == [None] * 4


async def test_an_unknown_token_pays_like_no_token_from_the_same_bucket(
    ticks: Clock, make_context: Any
) -> None:
    limiter = limits(ticks, anonymous=Limit(1, 3))
    assert await limiter.admit(make_context("rpcs_garbage-1"), [1, 1]) == [None, None]
    assert await limiter.admit(make_context(), [1, 1]) == [None, 1.0]
    assert await limiter.admit(make_context("rpcs_garbage-2"), [1]) == [1.0]


async def test_calls_run_in_order_while_the_budget_lasts_each_at_its_cost(
    ticks: Clock, make_context: Any
) -> None:
    limiter = limits(ticks, anonymous=Limit(10, 25))
    costs = [cost_of({"method": m}) for m in ("rpc.discover",) * 3 + ("course.list",)]
    assert costs == [10, 10, 10, 1]
    # 25 granted: two discoveries (20); the third does not fit, nor does anything after it
    # (the 5 left over are spent: a request asking for more than it may have loses them).
    assert await limiter.admit(make_context(), costs) == [None, None, 1.0, 0.1]


async def test_a_call_never_costs_more_than_the_burst(ticks: Clock, make_context: Any) -> None:
    limiter = limits(ticks, anonymous=Limit(1, 5))
    assert CALL_COSTS["rpc.discover"] > 5
    assert await limiter.admit(make_context(), [cost_of({"method": "rpc.discover"})]) == [None]
    assert await limiter.admit(make_context(), [10]) == [5.0]


def test_what_calls_cost() -> None:
    assert cost_of({"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}) == 10
    assert cost_of({"jsonrpc": "2.0", "method": "purchase.list", "id": 1}) == 1
    assert cost_of({"jsonrpc": "2.0", "method": "no.such.method", "id": 1}) == 1


async def test_a_flood_of_new_garbage_tokens_is_looked_up_only_while_the_client_has_budget(
    ticks: Clock, make_context: Any, fake: FakeWorld, actors: ActorCache
) -> None:
    limiter = limits(ticks, anonymous=Limit(1, 5))
    verdicts = [await limiter.admit(make_context(f"rpcs_garbage-{n}"), [1]) for n in range(100)]
    assert verdicts == [[None]] * 5 + [[1.0]] * 95
    assert lookups(fake) == actors.lookups == 5  # the burst; the other 95 never looked up
    assert limiter.lookups_refused == 95
    # A neighbour's new token is looked up: only the empty client's are held back.
    assert await limiter.admit(make_context("rpcs_other", client=NEIGHBOUR), [1]) == [None]
    assert lookups(fake) == 6
    # Once the client's bucket refills, its tokens are looked up again.
    ticks.now += 1.0
    assert await limiter.admit(make_context("rpcs_garbage-100"), [1]) == [None]
    assert lookups(fake) == 7


async def test_a_client_flooding_without_a_token_does_not_hold_back_new_tokens(
    ticks: Clock, make_context: Any, fake: FakeWorld
) -> None:
    limiter = limits(ticks, anonymous=Limit(1, 2))
    assert await limiter.admit(make_context(), [1, 1, 1]) == [None, None, 1.0]  # empty
    # Behind the same address (a shared NAT), a buyer never seen before gets through.
    alice = fake.uow.add_token(fake.alice, "rpcs_alice")
    assert await limiter.admit(make_context(alice), [1, 1]) == [None, None]


async def test_tokens_that_authenticated_before_are_looked_up_even_from_a_flooding_client(
    ticks: Clock, make_context: Any, fake: FakeWorld
) -> None:
    # Staff tokens are never trusted from memory, so each request looks them up; the
    # staff member behind the attacker's address must still get through.
    limiter = limits(ticks, anonymous=Limit(1, 1))
    staff = fake.uow.add_token(fake.staff, "rpcs_staff")
    assert await limiter.admit(make_context(staff), [1]) == [None]
    assert await limiter.admit(make_context("rpcs_garbage-1"), [1]) == [None]  # looked up
    before = lookups(fake)
    assert await limiter.admit(make_context("rpcs_garbage-2"), [1]) == [1.0]  # not looked up
    assert lookups(fake) == before
    for _ in range(3):
        assert await limiter.admit(make_context(staff), [1, 1]) == [None, None]
    assert lookups(fake) == before + 3  # looked up every time (revocation is immediate)
    # The price of bounding lookups: a valid token this process has never seen, sent from
    # an address flooding garbage tokens, waits with them (it is not looked up).
    payments = fake.uow.add_token(fake.payments, "rpcs_payments")
    assert await limiter.admit(make_context(payments), [1]) == [1.0]
    assert lookups(fake) == before + 3
    ticks.now += 1.0
    assert await limiter.admit(make_context(payments), [1, 1]) == [None, None]


async def test_the_same_garbage_token_is_looked_up_once_while_it_is_remembered(
    ticks: Clock, make_context: Any, fake: FakeWorld, actors: ActorCache
) -> None:
    limiter = limits(ticks, anonymous=Limit(1000, 1000))
    for n in range(50):
        client = f"192.0.2.{n}"  # from 50 addresses: the cache, not the limit, saves lookups
        assert await limiter.admit(make_context("rpcs_same-garbage", client=client), [1]) == [None]
    assert lookups(fake) == 1
    assert actors.unknown_hits == 49


class UnreachableDatabase:
    """A unit-of-work factory whose database cannot be reached."""

    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self, *, write: bool = False) -> UnreachableDatabase:
        return self

    async def __aenter__(self) -> Any:
        self.attempts += 1
        raise ConnectionRefusedError("connection refused")

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


async def test_a_token_that_cannot_be_checked_is_not_counted(
    ticks: Clock, make_context: Any
) -> None:
    buckets = MemoryBuckets(clock=ticks)
    limiter = RateLimits(buckets, per_user=Limit(1, 1), anonymous=Limit(1, 1), clock=ticks)
    database = UnreachableDatabase()
    ctx = make_context("rpcs_some-token", uow=database)
    # Every call will answer -32000 from the same failed lookup, doing nothing else.
    assert await limiter.admit(ctx, [1, 1, 1]) == [None, None, None]
    assert len(buckets) == 0
    with pytest.raises(ConnectionRefusedError):
        await ctx.authenticate()
    assert database.attempts == 1  # the calls reuse the request's one lookup


async def test_with_a_limit_off_its_callers_are_not_counted(
    ticks: Clock, make_context: Any, fake: FakeWorld
) -> None:
    token = fake.uow.add_token(fake.alice, "rpcs_alice")
    no_user_limit = limits(ticks, per_user=None, anonymous=Limit(1, 1))
    assert await no_user_limit.admit(make_context(token), [1] * 50) == [None] * 50
    no_anonymous_limit = limits(ticks, per_user=Limit(1, 1), anonymous=None)
    assert await no_anonymous_limit.admit(make_context(), [1] * 50) == [None] * 50
    assert await no_anonymous_limit.admit(make_context("rpcs_garbage"), [1] * 50) == [None] * 50


async def test_memory_buckets_refill_and_forget_the_least_recently_used(ticks: Clock) -> None:
    buckets = MemoryBuckets(max_keys=3, clock=ticks)
    limit = Limit(rate=2.0, burst=4)
    assert await buckets.take("a", 5, limit) == Grant(4, 0.0)
    ticks.now += 0.5
    assert await buckets.take("a", 5, limit) == Grant(1, 0.0)
    for key in "bcd":
        await buckets.take(key, 1, limit)
    assert len(buckets) == 3
    assert await buckets.take("a", 5, limit) == Grant(4, 0.0)  # forgotten: a full bucket


def test_limit_arithmetic() -> None:
    limit = Limit(rate=10.0, burst=100)
    assert limit.full_after == 10.0
    assert limit.retry_after(0.0) == 0.1
    assert limit.retry_after(0.5, cost=10) == 0.95
    assert limit.retry_after(20.0, cost=10) == 0.0


class FlakyStore:
    """A bucket store that fails while ``down`` (as PostgreSQL unreachable would)."""

    def __init__(self) -> None:
        self.down = True
        self.attempts = 0
        self.buckets = MemoryBuckets()

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        self.attempts += 1
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return await self.buckets.take(key, calls, limit)


async def test_while_the_store_is_down_this_process_counts_and_tries_the_store_now_and_then(
    ticks: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    buckets = FallbackBuckets(store, MemoryBuckets(clock=ticks), retry_store_after=5.0, clock=ticks)
    limit = Limit(rate=1.0, burst=3)
    with caplog.at_level(logging.INFO, logger="rpc_server.jsonrpc.rate_limit"):
        grants = [await buckets.take("ip:203.0.113.7", 1, limit) for _ in range(5)]
        assert [g.granted for g in grants] == [1, 1, 1, 0, 0]  # limited, not open or closed
        assert store.attempts == 1 and buckets.store_down
        ticks.now += 5.0
        await buckets.take("ip:203.0.113.7", 1, limit)
        assert store.attempts == 2  # tried again after 5 s, still down
        store.down = False
        ticks.now += 5.0
        assert (await buckets.take("ip:203.0.113.7", 1, limit)).granted == 1
        assert store.attempts == 3 and not buckets.store_down
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "rate-limit store unavailable (ConnectionRefusedError): limiting in this "
            "process until it answers again",
        ),
        ("INFO", "rate-limit store available again"),
    ]


class CountingStore:
    """Memory buckets that record each take they are asked for (key, calls)."""

    def __init__(self, ticks: Clock) -> None:
        self.memory = MemoryBuckets(clock=ticks)
        self.takes: list[tuple[str, int]] = []
        self.fail: Exception | None = None

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        self.takes.append((key, calls))
        if self.fail is not None:
            raise self.fail
        return await self.memory.take(key, calls, limit)


async def test_takes_of_one_bucket_made_at_the_same_moment_are_taken_at_once(
    ticks: Clock,
) -> None:
    store = CountingStore(ticks)
    buckets = CoalescedBuckets(store)
    limit = Limit(rate=1.0, burst=5)
    grants = await asyncio.gather(
        buckets.take("user:1", 2, limit),
        buckets.take("user:1", 2, limit),
        buckets.take("ip:203.0.113.7", 1, limit),
        buckets.take("user:1", 2, limit),  # 6 asked of 5: the last gets 1, in order
    )
    assert sorted(store.takes) == [("ip:203.0.113.7", 1), ("user:1", 6)]
    assert [g.granted for g in grants] == [2, 2, 1, 1]
    assert [g.tokens_left for g in grants] == [0.0, 0.0, 4.0, 0.0]
    # The same as taking them one after another at that moment.
    one_by_one = MemoryBuckets(clock=ticks)
    assert [(await one_by_one.take("user:1", 2, limit)).granted for _ in range(3)] == [2, 2, 1]
    # A take alone, later, is its own statement.
    ticks.now += 2.0
    assert (await buckets.take("user:1", 5, limit)).granted == 2
    assert store.takes[-1] == ("user:1", 5)


async def test_a_failed_coalesced_take_fails_each_of_its_requests(ticks: Clock) -> None:
    store = CountingStore(ticks)
    store.fail = ConnectionRefusedError()
    buckets = FallbackBuckets(
        CoalescedBuckets(store), MemoryBuckets(clock=ticks), retry_store_after=5.0, clock=ticks
    )
    limit = Limit(rate=1.0, burst=3)
    grants = await asyncio.gather(*(buckets.take("user:1", 1, limit) for _ in range(4)))
    assert store.takes == [("user:1", 4)], "one attempt for all of them"
    # Each fell back to this process's buckets: limited there, neither open nor closed.
    assert [g.granted for g in grants] == [1, 1, 1, 0]
