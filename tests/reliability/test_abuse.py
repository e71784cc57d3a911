"""Abuse: floods without a token, with fresh garbage tokens, with one garbage token over and
over, and with batches of ``rpc.discover``, all at once, each from its own address (behind
a trusted proxy), while well-behaved clients keep calling.

Checked, on each engine: every flood gets 429 once its client's bucket is empty, and not
before; the well-behaved clients (a buyer from its own address, and a staff member whose
token is looked up on every request, from the garbage flooder's own address) get every
call answered; the token lookups the floods cause are bounded by the flooding client's
own budget, however many garbage tokens it sends; failed authentications are logged once
per client, at INFO, and nothing is logged at WARNING or above; on PostgreSQL no bucket
row exists for a token that did not authenticate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import ACTORS, LIMITER, create_app
from rpc_server.config import Settings
from rpc_server.domain.tokens import hash_token
from rpc_server.jsonrpc.token_cache import UNKNOWN_SECONDS
from tests.conftest import World

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

RATE_LIMITED = 429
UNAUTHENTICATED = 401
# Anonymous callers: 10 calls a second, bursts of 50 (the defaults are 10 and 100).
ANONYMOUS_RATE, ANONYMOUS_BURST = 10.0, 50
USER_RATE, USER_BURST = 50.0, 200
DISCOVER_COST = 10

NO_TOKEN_FLOODER = "198.51.100.10"
GARBAGE_FLOODER = "198.51.100.20"
REPEAT_FLOODER = "198.51.100.30"
DISCOVERY_FLOODER = "198.51.100.40"
BUYER = "192.0.2.1"


@dataclasses.dataclass
class Flood:
    """What one flood sent and got back."""

    requests: int = 0
    calls: int = 0
    answered: int = 0  # calls that ran (a result, or a 401 from running without a token)
    limited: int = 0
    answered_before_first_429: int | None = None
    bytes_out: int = 0
    started: float = 0.0
    finished: float = 0.0

    def record(self, answers: list[dict[str, Any]], size: int) -> None:
        self.requests += 1
        self.calls += len(answers)
        self.bytes_out += size
        for answer in answers:
            if answer.get("error", {}).get("code") == RATE_LIMITED:
                if self.answered_before_first_429 is None:
                    self.answered_before_first_429 = self.answered
                self.limited += 1
            else:
                self.answered += 1

    def budget(self, cost: int = 1) -> float:
        """The most calls of ``cost`` the client's bucket could have granted, plus one."""
        return (ANONYMOUS_BURST + ANONYMOUS_RATE * (self.finished - self.started)) / cost + 1


async def send(
    client: TestClient[Any, Any], body: Any, *, token: str | None, address: str
) -> tuple[list[dict[str, Any]], int]:
    headers = {"X-Forwarded-For": address}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await client.post("/rpc", json=body, headers=headers)
    assert response.status == 200, await response.text()
    raw = await response.read()
    answer = await response.json()
    return (answer if isinstance(answer, list) else [answer]), len(raw)


def call(method: str, id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "id": id}


@pytest.fixture
def token_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL statements reading api_tokens that reach a driver (aiosqlite's thread or
    asyncpg), as the database sees them: every token lookup is one."""
    seen: list[str] = []
    for name in ("execute", "execute_fetchall"):
        original_sqlite = getattr(aiosqlite.Connection, name)

        async def sqlite_recorded(
            self: aiosqlite.Connection, sql: str, *args: Any, _original: Any = original_sqlite
        ) -> Any:
            if "FROM users JOIN api_tokens" in sql:
                seen.append(sql)
            return await _original(self, sql, *args)

        monkeypatch.setattr(aiosqlite.Connection, name, sqlite_recorded)
    for name in ("fetch", "execute"):
        original = getattr(asyncpg.Connection, name)

        async def recorded(self: Any, sql: str, *args: Any, _original: Any = original) -> Any:
            if "FROM users JOIN api_tokens" in sql:
                seen.append(sql)
            return await _original(self, sql, *args)

        monkeypatch.setattr(asyncpg.Connection, name, recorded)
    return seen


@pytest.fixture
async def server(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> TestClient[Any, Any]:
    return await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings,
                rate_limit=USER_RATE, rate_burst=USER_BURST,
                anonymous_rate_limit=ANONYMOUS_RATE, anonymous_rate_burst=ANONYMOUS_BURST,
                trusted_proxies=("127.0.0.1",),  # the test client: a proxy naming clients
                token_cache_seconds=5.0,
            )
        )
    )  # fmt: skip


async def test_floods_are_limited_per_client_and_well_behaved_tokens_are_not(
    server: TestClient[Any, Any],
    world: World,
    engine: AsyncEngine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    token_lookups: list[str],
) -> None:
    caplog.set_level(logging.INFO)
    app = server.app
    actors, limits = app[ACTORS], app[LIMITER]
    # The staff member works from the garbage flooder's address (a shared NAT), and has
    # called once before the flood; staff tokens are still looked up on every request.
    first, _ = await send(server, call("purchase.list", 0), token=world.staff.token,
                          address=GARBAGE_FLOODER)  # fmt: skip
    assert "result" in first[0]
    floods = {name: Flood() for name in ("no token", "fresh garbage", "same garbage", "discover")}
    garbage_tokens: list[str] = []
    calm = asyncio.Event()  # set when the well-behaved clients are done

    def fresh_garbage(n: int) -> str:
        garbage_tokens.append(f"rpcs_garbage-{n:06d}")
        return garbage_tokens[-1]

    async def flood(name: str, at_least: int, body: Callable[[int], Any],
                    token: Callable[[int], str | None], address: str) -> None:  # fmt: skip
        """Send requests one after another until the well-behaved clients are done."""
        record = floods[name]
        record.started = time.monotonic()
        n = 0
        while n < at_least or not calm.is_set():
            answers, size = await send(server, body(n), token=token(n), address=address)
            record.record(answers, size)
            n += 1
        record.finished = time.monotonic()

    latencies: list[float] = []
    failures: list[Any] = []

    async def well_behaved(token: str, address: str, rounds: int) -> None:
        for n in range(rounds):
            batch = [call("purchase.list", 2 * n), call("course.list", 2 * n + 1)]
            started = time.monotonic()
            answers, _ = await send(server, batch, token=token, address=address)
            latencies.append(time.monotonic() - started)
            failures.extend(a for a in answers if "result" not in a)
            await asyncio.sleep(0.02)  # a client doing something with its answers

    async def well_behaved_clients() -> None:
        await asyncio.gather(
            well_behaved(world.alice.token, BUYER, 40),
            well_behaved(world.staff.token, GARBAGE_FLOODER, 40),
        )
        calm.set()

    await asyncio.gather(
        flood("no token", 60, lambda n: [call("course.list", n * 5 + i) for i in range(5)],
              lambda n: None, NO_TOKEN_FLOODER),
        flood("fresh garbage", 300, lambda n: call("purchase.list", n), fresh_garbage,
              GARBAGE_FLOODER),
        flood("same garbage", 200, lambda n: call("purchase.list", n),
              lambda n: "rpcs_the-same-garbage", REPEAT_FLOODER),
        flood("discover", 20, lambda n: [call("rpc.discover", n * 100 + i) for i in range(100)],
              lambda n: None, DISCOVERY_FLOODER),
        well_behaved_clients(),
    )  # fmt: skip
    elapsed = max(r.finished for r in floods.values()) - min(r.started for r in floods.values())

    # Every flood got 429 once its bucket was empty, and not before.
    for name, record in floods.items():
        cost = DISCOVER_COST if name == "discover" else 1
        assert record.limited > 0, name
        assert record.answered_before_first_429 is not None
        assert record.answered_before_first_429 >= ANONYMOUS_BURST // cost, (name, record)
        assert record.answered <= record.budget(cost), (name, record)
    discover = floods["discover"]
    # 2,000 discoveries asked for, a few dozen sent: ~13 KB each, not 27 MB in all.
    assert discover.answered <= discover.budget(DISCOVER_COST)

    # The well-behaved clients were not slowed: every call answered.
    assert failures == []
    assert len(latencies) == 80

    # Token lookups: the fresh garbage tokens cost at most the flooder's budget of failed
    # lookups (not one per token), the repeated one a lookup per 10 s it is remembered.
    garbage = floods["fresh garbage"]
    assert len(token_lookups) == actors.lookups  # the counter is what the database saw
    repeated_lookups = 1 + int(elapsed // UNKNOWN_SECONDS)
    assert actors.failed_lookups <= garbage.budget() + repeated_lookups
    assert limits.lookups_refused >= garbage.requests - garbage.budget()
    assert actors.unknown_hits >= floods["same garbage"].answered - repeated_lookups

    # One INFO line per client with failed authentications, nothing at WARNING or above.
    auth_lines = [r for r in caplog.records if r.name == "rpc_server.auth"]
    assert sorted(r.getMessage().split(":")[0] for r in auth_lines) == [
        f"authentication failed from {GARBAGE_FLOODER}",
        f"authentication failed from {REPEAT_FLOODER}",
    ]
    assert {r.levelname for r in auth_lines} == {"INFO"}
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]

    if backend == "postgresql":
        async with engine.connect() as connection:
            keys = set(
                (await connection.execute(text("SELECT key FROM rate_limit_buckets"))).scalars()
            )
        users = {f"user:{u.actor.user_id}" for u in (world.alice, world.staff)}
        addresses = {f"ip:{a}" for a in (NO_TOKEN_FLOODER, GARBAGE_FLOODER, REPEAT_FLOODER,
                                         DISCOVERY_FLOODER)}  # fmt: skip
        assert keys == users | addresses
        assert not {hash_token(t) for t in [*garbage_tokens, "rpcs_the-same-garbage"]} & keys

    print(
        f"\nabuse [{backend}]: "
        + "; ".join(
            f"{name}: {r.calls} calls in {r.requests} requests, {r.answered} answered "
            f"({r.answered_before_first_429} before the first 429), {r.limited} limited, "
            f"{r.bytes_out // 1024} KiB out, {r.finished - r.started:.1f} s"
            for name, r in floods.items()
        )
        + f"; token lookups: {actors.lookups} ({actors.failed_lookups} failed, "
        f"{limits.lookups_refused} refused before a lookup, {actors.unknown_hits} spared by "
        f"the unknown-token memory); well-behaved calls: {2 * len(latencies)} all answered, "
        f"median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )
