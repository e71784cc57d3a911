"""What the process remembers of tokens: buyers trusted briefly (never past expiry), staff
and payments never, unknown tokens remembered as unknown, everything bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rpc_server.domain.records import Actor
from rpc_server.domain.states import Scope
from rpc_server.jsonrpc.token_cache import ActorCache

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clocks:
    """A monotonic clock and a wall clock that move together, only when told to."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def monotonic(self) -> float:
        return self.seconds

    def wall(self) -> datetime:
        return NOW + timedelta(seconds=self.seconds - 1000.0)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def cache(
    clocks: Clocks, ttl: float = 5.0, *, unknown_seconds: float = 10.0, max_entries: int = 100
) -> ActorCache:
    return ActorCache(
        ttl,
        unknown_seconds=unknown_seconds,
        max_entries=max_entries,
        clock=clocks.monotonic,
        wall_clock=clocks.wall,
    )


def actor(scope: Scope = Scope.BUYER, expires_in: float | None = None) -> Actor:
    expires_at = None if expires_in is None else NOW + timedelta(seconds=expires_in)
    return Actor(7, "someone@example.com", scope, token_expires_at=expires_at)


def test_a_buyer_token_is_trusted_for_the_cache_time_only(clocks: Clocks) -> None:
    actors = cache(clocks, ttl=5.0)
    buyer = actor()
    actors.put("h", buyer)
    assert actors.get("h") == buyer
    clocks.advance(4.9)
    assert actors.get("h") == buyer
    clocks.advance(0.1)
    assert actors.get("h") is None  # look it up again: revocation shows within 5 s


@pytest.mark.parametrize("scope", [Scope.STAFF, Scope.PAYMENTS])
def test_staff_and_payments_tokens_are_never_trusted_from_memory(
    clocks: Clocks, scope: Scope
) -> None:
    actors = cache(clocks, ttl=300.0)
    actors.put("h", actor(scope))
    assert actors.get("h") is None  # looked up on every request: revocation is immediate
    assert actors.has_authenticated("h")  # known, for the rate limits, but not trusted


def test_a_token_is_never_trusted_past_its_expiry(clocks: Clocks) -> None:
    actors = cache(clocks, ttl=5.0)
    actors.put("soon", actor(expires_in=2.0))
    actors.put("later", actor(expires_in=60.0))
    clocks.advance(1.9)
    assert actors.get("soon") is not None
    clocks.advance(0.1)
    assert actors.get("soon") is None  # expired at 2 s, though the cache time is 5 s
    assert actors.get("later") is not None


def test_an_expired_token_is_not_cached_at_all(clocks: Clocks) -> None:
    actors = cache(clocks, ttl=5.0)
    actors.put("h", actor(expires_in=-1.0))
    assert actors.get("h") is None


def test_an_unknown_token_is_remembered_as_unknown_for_a_while(clocks: Clocks) -> None:
    actors = cache(clocks, unknown_seconds=10.0)
    actors.put_unknown("bad")
    assert actors.is_unknown("bad")
    assert not actors.is_unknown("other")
    clocks.advance(9.9)
    assert actors.is_unknown("bad")
    clocks.advance(0.1)
    assert not actors.is_unknown("bad")  # looked up again


def test_a_successful_lookup_replaces_an_unknown_entry(clocks: Clocks) -> None:
    actors = cache(clocks)
    actors.put_unknown("h")
    actors.put("h", actor())
    assert not actors.is_unknown("h") and actors.get("h") is not None
    actors.put_unknown("h")  # revoked since
    assert actors.is_unknown("h") and actors.get("h") is None


def test_without_a_cache_time_nothing_is_trusted_but_unknown_tokens_are_remembered(
    clocks: Clocks,
) -> None:
    actors = cache(clocks, ttl=0.0)
    actors.put("good", actor())
    actors.put_unknown("bad")
    assert actors.get("good") is None
    assert actors.is_unknown("bad")


def test_every_memory_is_bounded(clocks: Clocks) -> None:
    actors = cache(clocks, max_entries=3)
    for number in range(10):
        actors.put(f"good{number}", actor())
        actors.put_unknown(f"bad{number}")
    assert [actors.get(f"good{n}") is not None for n in range(10)] == [False] * 7 + [True] * 3
    assert [actors.is_unknown(f"bad{n}") for n in range(10)] == [False] * 7 + [True] * 3
    assert [actors.has_authenticated(f"good{n}") for n in range(10)] == [False] * 7 + [True] * 3
