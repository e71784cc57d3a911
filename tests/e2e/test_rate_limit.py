"""Rate limits over HTTP: a valid token's calls are counted per user, every other call per
client address; counted per call at its cost (``rpc.discover`` weighs 10); 429 with
retry_after, nothing run beyond it; on PostgreSQL buckets are rows shared by processes,
never keyed by a token that did not authenticate, purged when idle, and an unreachable
store leaves each process limiting on its own, never a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.tokens import hash_token
from rpc_server.jsonrpc.buckets import DatabaseBuckets, Limit
from tests.conftest import World
from tests.e2e.conftest import SERVICE_UNAVAILABLE
from tests.tcp_proxy import TcpProxy

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
RATE_LIMITED = 429
UNAUTHENTICATED = 401
PROXY = "127.0.0.1"  # the test client's address: trusted, so X-Forwarded-For names clients


def call(method: str, id: Any, params: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


def limited_settings(settings: Settings, **overrides: Any) -> Settings:
    # Slow refills (one call per 2 s): a test's next request comes long before one more
    # call is due, however loaded the machine.
    values: dict[str, Any] = {
        "rate_limit": 0.5,
        "rate_burst": 5,
        "anonymous_rate_limit": 0.5,
        "anonymous_rate_burst": 3,
        "trusted_proxies": (PROXY,),
        **overrides,
    }
    return dataclasses.replace(settings, **values)


@pytest.fixture
async def limited(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(limited_settings(settings)))


async def post(
    client: TestClient[Any, Any],
    body: Any,
    token: str | None = None,
    *,
    client_address: str | None = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if client_address is not None:
        headers["X-Forwarded-For"] = client_address
    response = await client.post("/rpc", json=body, headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


def codes(answers: list[dict[str, Any]]) -> list[int | None]:
    """Each answer's error code (None for a result), in id order."""
    by_id = sorted(answers, key=lambda a: a["id"])
    return [a["error"]["code"] if "error" in a else None for a in by_id]


async def bucket_keys(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set((await connection.execute(text("SELECT key FROM rate_limit_buckets"))).scalars())


# --- who pays ---------------------------------------------------------------------------


async def test_a_batch_is_counted_per_item(
    limited: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    batch = [
        call("purchase.create", i, {"course": "python-basics", "idempotency_key": f"k{i}"})
        for i in range(8)
    ]
    answers = {a["id"]: a for a in await post(limited, batch, world.alice.token)}
    allowed = [i for i in range(8) if "result" in answers[i]]
    limited_ids = [i for i in range(8) if "error" in answers[i]]
    assert allowed == [0, 1, 2, 3, 4]  # the burst, in order
    assert limited_ids == [5, 6, 7]
    for i in limited_ids:
        error = answers[i]["error"]
        assert error["code"] == RATE_LIMITED and error["message"] == "Too many requests"
        assert 0 < error["data"]["retry_after"] <= 2.0  # one call refills in 2 s
    async with engine.connect() as connection:
        created = (await connection.execute(text("SELECT count(*) FROM purchases"))).scalar()
    assert created == 5  # nothing beyond the limit ran


async def test_the_bucket_belongs_to_the_user_and_refills(
    limited: TestClient[Any, Any], world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    second_token = await services.issue_token(uow_factory, world.alice.email)
    burst = [call("course.list", i) for i in range(3)]
    assert codes(await post(limited, burst, world.alice.token)) == [None] * 3
    # Alice's other token draws from the same bucket: a new token is no new budget.
    more = [call("course.list", i) for i in range(3)]
    assert codes(await post(limited, more, second_token)) == [None, None, RATE_LIMITED]
    over = await post(limited, call("course.list", 99), world.alice.token)
    assert over["error"]["code"] == RATE_LIMITED
    # Bob has his own bucket.
    assert "result" in await post(limited, call("course.list", 1), world.bob.token)
    await asyncio.sleep(over["error"]["data"]["retry_after"] + 0.05)
    assert "result" in await post(limited, call("course.list", 100), world.alice.token)


async def test_limited_notifications_are_dropped_silently(
    limited: TestClient[Any, Any], world: World
) -> None:
    batch = [call("course.list", i) for i in range(5)] + [
        {"jsonrpc": "2.0", "method": "course.list"}
    ]
    answers = await post(limited, batch, world.alice.token)
    assert len(answers) == 5 and all("result" in a for a in answers)


async def test_calls_without_a_token_are_limited_per_client_address(
    limited: TestClient[Any, Any], world: World
) -> None:
    batch = [call("course.list", i) for i in range(4)]
    answers = await post(limited, batch, client_address="198.51.100.1")
    assert codes(answers) == [None, None, None, RATE_LIMITED]
    assert 0 < answers[3]["error"]["data"]["retry_after"] <= 2.0
    over = await post(limited, call("course.list", 9), client_address="198.51.100.1")
    assert over["error"]["code"] == RATE_LIMITED
    # Another client, and the proxy's own calls, have buckets of their own.
    assert codes(await post(limited, batch[:3], client_address="198.51.100.2")) == [None] * 3
    assert codes(await post(limited, batch[:3])) == [None] * 3


async def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    client = await aiohttp_client(create_app(limited_settings(settings, trusted_proxies=())))
    # Each made-up address would be a fresh bucket if the header were believed.
    answers = [
        await post(client, call("course.list", n), client_address=f"198.51.100.{n}")
        for n in range(5)
    ]
    assert ["error" in a for a in answers] == [False, False, False, True, True]


async def test_unknown_tokens_are_counted_in_their_clients_bucket_never_their_own(
    limited: TestClient[Any, Any], world: World, engine: AsyncEngine, backend: str
) -> None:
    attacker = "203.0.113.7"
    # Alice's token has worked here before; bob's is new to this server.
    assert "result" in await post(
        limited, call("purchase.list", 0), world.alice.token, client_address="192.0.2.1"
    )
    garbage = [f"rpcs_garbage-{n}" for n in range(6)]
    answers = [
        await post(limited, call("purchase.list", n), token, client_address=attacker)
        for n, token in enumerate(garbage)
    ]
    assert [a["error"]["code"] for a in answers] == [UNAUTHENTICATED] * 3 + [RATE_LIMITED] * 3
    # No token at all, from the same client, draws from that same (empty) bucket.
    none = await post(limited, call("course.list", 7), client_address=attacker)
    assert none["error"]["code"] == RATE_LIMITED
    # Alice, behind the same address, is counted in her own bucket.
    alices = await post(
        limited, call("purchase.list", 8), world.alice.token, client_address=attacker
    )
    assert "result" in alices
    # Bob's token, new here, is not looked up while that address floods garbage tokens...
    bobs = await post(limited, call("purchase.list", 9), world.bob.token, client_address=attacker)
    assert bobs["error"]["code"] == RATE_LIMITED
    # ...only until the address may cause a failed lookup again (one per 2 s here).
    await asyncio.sleep(bobs["error"]["data"]["retry_after"])
    bobs = await post(limited, call("purchase.list", 9), world.bob.token, client_address=attacker)
    assert "result" in bobs
    if backend == "postgresql":
        keys = await bucket_keys(engine)
        assert keys == {f"ip:{attacker}"} | {
            f"user:{user.actor.user_id}" for user in (world.alice, world.bob)
        }
        assert not {hash_token(t) for t in garbage} & keys


async def test_a_client_over_its_limit_without_a_token_does_not_hold_back_new_tokens(
    limited: TestClient[Any, Any], world: World
) -> None:
    batch = [call("course.list", i) for i in range(4)]
    assert codes(await post(limited, batch, client_address="203.0.113.8"))[3] == RATE_LIMITED
    # Behind the same address (a shared NAT), a buyer new to this server gets through.
    answers = await post(limited, batch, world.bob.token, client_address="203.0.113.8")
    assert codes(answers) == [None] * 4


async def test_rpc_discover_costs_ten_calls(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    client = await aiohttp_client(
        create_app(limited_settings(settings, anonymous_rate_limit=1.0, anonymous_rate_burst=25))
    )
    batch = [call("rpc.discover", i) for i in range(5)]
    answers = sorted(await post(client, batch, client_address="192.0.2.1"), key=lambda a: a["id"])
    assert codes(answers) == [None, None] + [RATE_LIMITED] * 3
    assert answers[0]["result"]["openrpc"]
    # The refused discoveries may come back when ten calls have refilled.
    assert {a["error"]["data"]["retry_after"] for a in answers[2:]} == {10.0}
    # A cheap call after them in the same batch waits only for its own cost.
    mixed = [call("rpc.discover", 1), call("course.list", 2)]
    answers = await post(client, mixed, client_address="192.0.2.2")
    assert codes(answers) == [None, None]  # 11 of 25


async def test_a_call_heavier_than_the_burst_still_runs(
    limited: TestClient[Any, Any], world: World
) -> None:
    # rpc.discover weighs 10, the anonymous burst here is 3: it costs the whole burst.
    answers = await post(limited, [call("rpc.discover", 1), call("course.list", 2)])
    assert codes(answers) == [None, RATE_LIMITED]


async def test_zero_turns_limiting_off(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    client = await aiohttp_client(
        create_app(limited_settings(settings, rate_limit=0, rate_burst=1, anonymous_rate_limit=0))
    )
    batch = [call("course.list", i) for i in range(50)]
    assert codes(await post(client, batch, world.alice.token)) == [None] * 50
    assert codes(await post(client, batch)) == [None] * 50
    assert codes(await post(client, batch, "rpcs_garbage")) == [None] * 50


async def test_each_limit_can_be_off_alone(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    users_off = await aiohttp_client(create_app(limited_settings(settings, rate_limit=0)))
    batch = [call("course.list", i) for i in range(20)]
    assert codes(await post(users_off, batch, world.alice.token)) == [None] * 20
    assert codes(await post(users_off, batch))[3:] == [RATE_LIMITED] * 17
    anonymous_off = await aiohttp_client(
        create_app(limited_settings(settings, anonymous_rate_limit=0))
    )
    assert codes(await post(anonymous_off, batch)) == [None] * 20
    assert codes(await post(anonymous_off, batch, world.alice.token))[5:] == [RATE_LIMITED] * 15


# --- PostgreSQL: buckets as rows ----------------------------------------------------------


@pytest.mark.backends("postgresql")
async def test_the_bucket_is_shared_by_processes_on_postgresql(
    aiohttp_client: AiohttpClient, settings: Settings, world: World
) -> None:
    """Two apps (as two processes would be) draw from one bucket in the database."""
    tight = limited_settings(settings, rate_limit=0.5, rate_burst=6)
    first = await aiohttp_client(create_app(tight))
    second = await aiohttp_client(create_app(tight))
    batch = [call("course.list", i) for i in range(4)]
    one = await post(first, batch, world.alice.token)
    two = await post(second, batch, world.alice.token)
    granted = sum("result" in a for a in one + two)
    assert granted == 6
    assert sum(a.get("error", {}).get("code") == RATE_LIMITED for a in one + two) == 2


async def hurry(
    aiohttp_client: AiohttpClient, settings: Settings, token: str, burst: int, rate: float
) -> tuple[list[dict[str, Any]], float]:
    """300 requests of one user, 12 at a time, through two apps (as two processes would
    be): the answers and the seconds they took."""
    busy = limited_settings(settings, rate_limit=rate, rate_burst=burst)
    apps = [await aiohttp_client(create_app(busy)) for _ in range(2)]
    started = asyncio.get_running_loop().time()
    answers: list[dict[str, Any]] = []

    async def caller(number: int) -> None:
        for i in range(25):
            answers.append(await post(apps[(number + i) % 2], call("course.list", i), token))

    await asyncio.gather(*(caller(n) for n in range(12)))
    return answers, asyncio.get_running_loop().time() - started


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calls asked of PostgreSQL by each bucket statement."""
    asked: list[int] = []
    take = DatabaseBuckets.take

    async def counted(self: DatabaseBuckets, key: str, calls: int, limit: Limit) -> Any:
        asked.append(calls)
        return await take(self, key, calls, limit)

    monkeypatch.setattr(DatabaseBuckets, "take", counted)
    return asked


@pytest.mark.backends("postgresql")
async def test_a_busy_caller_under_its_limit_needs_a_statement_for_few_of_its_requests(
    aiohttp_client: AiohttpClient, settings: Settings, world: World, statements: list[int]
) -> None:
    answers, _ = await hurry(aiohttp_client, settings, world.alice.token, burst=1000, rate=0.5)
    assert all("result" in a for a in answers)
    # Most requests were granted from what each app took ahead (up to 100 calls, a tenth
    # of the burst), the rest coalesced: here about 40 statements; one per request
    # would be 300, coalesced alone about 180.
    assert len(statements) <= 300 // 3, statements
    assert max(statements) > 1, "some took ahead"
    assert sum(statements) <= 300 + 2 * 1000 // 10


@pytest.mark.backends("postgresql")
async def test_two_processes_taking_ahead_grant_no_more_than_the_bucket_and_strand_little(
    aiohttp_client: AiohttpClient, settings: Settings, world: World, statements: list[int]
) -> None:
    burst, rate = 200, 0.5  # a tenth of the burst: 20 calls
    answers, elapsed = await hurry(aiohttp_client, settings, world.alice.token, burst, rate)
    granted = sum("result" in a for a in answers)
    refused = [a for a in answers if "error" in a]
    assert {a["error"]["code"] for a in refused} == {RATE_LIMITED}
    assert granted + len(refused) == 300
    # At most the burst and the refill; at least the burst less what each app may hold.
    assert burst - 2 * burst // 10 <= granted <= burst + rate * elapsed + 1
    assert max(statements) > 1, "some took ahead"


async def add_bucket(engine: AsyncEngine, key: str, tokens: float, idle_seconds: float) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO rate_limit_buckets (key, tokens, updated_at, last_granted) "
                "VALUES (:key, :tokens, now() - make_interval(secs => :idle), 1)"
            ),
            {"key": key, "tokens": tokens, "idle": idle_seconds},
        )


@pytest.mark.backends("postgresql")
async def test_idle_buckets_are_purged_and_busy_ones_kept(
    engine: AsyncEngine, db_engine: Engine
) -> None:
    # Limits refilling in at most 10 s: a bucket idle longer is full, the same as none.
    buckets = DatabaseBuckets(db_engine, idle_after=10.0, purge_interval=3600.0)
    await add_bucket(engine, "ip:198.51.100.1", 0.0, idle_seconds=11)  # full again
    await add_bucket(engine, "user:1", 0.0, idle_seconds=9)  # still refilling
    await add_bucket(engine, hash_token("rpcs_old-release")[:32], 480.0, idle_seconds=3600)
    await buckets.take("ip:198.51.100.2", 1, Limit(1.0, 10))
    assert await buckets.purge() == 2
    assert await bucket_keys(engine) == {"user:1", "ip:198.51.100.2"}


@pytest.mark.backends("postgresql")
async def test_a_take_purges_now_and_then(engine: AsyncEngine, db_engine: Engine) -> None:
    buckets = DatabaseBuckets(db_engine, idle_after=10.0, purge_interval=0.0)
    await add_bucket(engine, "ip:198.51.100.1", 0.0, idle_seconds=60)
    grant = await buckets.take("ip:198.51.100.2", 3, Limit(1.0, 10))
    assert (grant.granted, grant.tokens_left) == (3, 7.0)
    assert await bucket_keys(engine) == {"ip:198.51.100.2"}
    later = DatabaseBuckets(db_engine, idle_after=10.0, purge_interval=3600.0)
    await add_bucket(engine, "ip:198.51.100.3", 0.0, idle_seconds=60)
    await later.take("ip:198.51.100.2", 1, Limit(1.0, 10))
    assert "ip:198.51.100.3" in await bucket_keys(engine)  # not yet: once per interval


@pytest.mark.backends("postgresql")
async def test_when_the_bucket_store_is_down_limits_hold_in_the_process_and_nothing_is_a_500(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = make_url(settings.database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    app_settings = limited_settings(
        settings, database_url=proxied, anonymous_rate_burst=30, db_connect_timeout=1.0,
        db_pool_timeout=1.0, token_cache_seconds=300,
        rate_limit=0.01, anonymous_rate_limit=0.01,  # no refill while the test runs
    )  # fmt: skip
    try:
        client = await aiohttp_client(create_app(app_settings))
        assert "result" in await post(client, call("purchase.list", 1), world.alice.token)
        await proxy.stop()  # PostgreSQL is gone: buckets, tokens, everything

        async def answer(body: Any, token: str | None = None) -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await client.post("/rpc", json=body, headers=headers)
            assert response.status == 200, await response.text()
            return await response.json()

        with caplog.at_level(logging.INFO):
            # A call that needs the database says so, as any call would.
            listing = await answer(call("course.list", 1))
            assert listing["error"]["code"] == SERVICE_UNAVAILABLE
            # Discovery needs no database: limited by this process, not opened wide.
            discoveries = await answer([call("rpc.discover", i) for i in range(5)])
            assert codes(discoveries) == [None, None, RATE_LIMITED, RATE_LIMITED, RATE_LIMITED]
            # Alice (trusted from memory) still counts in her own bucket, in memory now.
            batch = [call("purchase.list", i) for i in range(7)]
            alices = codes(await answer(batch, world.alice.token))
            assert alices == [SERVICE_UNAVAILABLE] * 5 + [RATE_LIMITED] * 2
            # A token that cannot be checked is not counted; each call says why.
            bobs = codes(await answer(batch, world.bob.token))
            assert bobs == [SERVICE_UNAVAILABLE] * 7
        store_lines = [r for r in caplog.records if "rate-limit store" in r.getMessage()]
        assert [r.levelname for r in store_lines] == ["WARNING"]  # once, not per request
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await proxy.stop()
