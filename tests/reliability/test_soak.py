"""Soak: a mixed, frontend-like load for a while; no 5xx, no malformed answer, flat memory.

Several users, each with their own keep-alive HTTP session the way a browser has, browse
courses, list and page through their purchases, look one up, check out (create with an
idempotency key, sometimes retried, then fulfill with the payment's signed proof, fail
or cancel, sometimes repeated; a course they are registered for is not offered to them,
and a user who has them all signs up again as a new one), list their registrations, send
batches (with a notification in them) and now and then a bad call; the support desk
lists and reads everyone's. The server runs as a real process with its production
defaults (rate limit included) and its deliverer sending receipts to a real SMTP server.

Checked: no HTTP 5xx and no transport error, every body a valid JSON-RPC 2.0 answer to
what was sent, no error but the expected ones (404, 409, invalid params, unknown method,
rate limited), no traceback in the server's log, every receipt delivered exactly once,
a clean exit 0 on SIGTERM, and memory flat: the server's VmRSS is sampled every second
after a warm-up, and the median of the last third of the samples is at most 10% above
the median of the first third.

The length is ``RPC_SERVER_SOAK_SECONDS`` (default 20, for CI). A long soak::

    RPC_SERVER_SOAK_SECONDS=300 .venv/bin/pytest -m reliability -s tests/reliability/test_soak.py

(with ``RPC_SERVER_TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test``
to soak PostgreSQL too).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.jsonrpc.errors import (
    CONFLICT,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    NOT_FOUND,
)
from tests.conftest import World
from tests.reliability.load import (
    RpcLoad,
    ServerProcess,
    add_courses,
    duplicates,
    eventually_all_sent,
    mail_server,
    paid_fulfil,
    receipt_message_id,
    server_env,
    started,
)

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("RPC_SERVER_SOAK_SECONDS", "20"))
WARM_UP_SECONDS = max(3.0, SOAK_SECONDS * 0.15)
MAX_RSS_GROWTH = 0.10
BUYERS = 6
# Codes a well-behaved frontend meets: another user's or an unknown id, a repeated
# outcome that conflicts, its own bad calls, and the rate limit.
RATE_LIMITED = 429
EXPECTED_CODES = {NOT_FOUND, CONFLICT, INVALID_PARAMS, METHOD_NOT_FOUND, RATE_LIMITED}
# The catalog: the world's two courses and a few more (course.list stays small).
EXTRA_COURSES = 8


class Shopper:
    """One user's frontend: a keep-alive session and what it has bought so far."""

    def __init__(
        self,
        load: RpcLoad,
        token: str,
        name: str,
        rng: random.Random,
        *,
        courses: tuple[str, ...] = (),
        sign_up: Callable[[], Awaitable[str]] | None = None,
    ):
        self.load, self.token, self.name, self.rng = load, token, name, rng
        self.courses, self.sign_up = courses, sign_up
        self.purchases: list[str] = []
        self.keys: list[str] = []
        # The courses this user is registered for (a frontend does not offer them).
        self.owned: set[str] = set()
        self.steps = 0

    async def call(self, method: str, params: Any = None, *, token: bool = True) -> Any:
        exchange = await self.load.call(method, params, token=self.token if token else None)
        return exchange.result()

    async def browse(self) -> None:
        await self.call("course.list", token=False)

    async def list_pages(self) -> None:
        params: dict[str, Any] = {"limit": self.rng.choice((5, 20, 50))}
        if self.rng.random() < 0.4:
            params["state"] = self.rng.choice(("pending", "fulfilled", "failed", "canceled"))
        for _ in range(self.rng.randint(1, 3)):
            page = await self.call("purchase.list", params)
            if not page or page["next_cursor"] is None:
                return
            params["cursor"] = page["next_cursor"]

    async def look_up(self) -> None:
        if self.purchases and self.rng.random() < 0.9:
            await self.call("purchase.get", [self.rng.choice(self.purchases)])
        else:
            await self.call("purchase.get", {"purchase_id": f"{self.rng.getrandbits(128):032x}"})

    async def check_out(self) -> None:
        offered = [course for course in self.courses if course not in self.owned]
        if not offered:
            assert self.sign_up is not None
            self.token = await self.sign_up()  # a new user, with nothing bought yet
            self.purchases, self.keys, self.owned = [], [], set()
            offered = list(self.courses)
        if self.keys and self.rng.random() < 0.1:
            key = self.rng.choice(self.keys)  # a retried checkout: the same purchase
        else:
            key = f"{self.name}-{self.steps}"
            self.keys.append(key)
        created = await self.call(
            "purchase.create", {"course": self.rng.choice(offered), "idempotency_key": key}
        )
        if created is None:
            return
        purchase_id = created["purchase_id"]
        self.purchases.append(purchase_id)
        outcome = self.rng.choices(("fulfilled", "failed", "canceled"), (7, 2, 1))[0]
        params: dict[str, Any] = {"purchase_id": purchase_id, "purchase_state": outcome}
        if outcome == "fulfilled":
            params = paid_fulfil(created)  # paid: the payment's proof goes along
        if outcome == "failed":
            params["error_msg"] = "card declined"
        answers = [
            await self.call("purchase.fulfill", params)
            for _ in range(self.rng.choice((1, 1, 1, 2)))  # a double click now and then
        ]
        if outcome == "failed" and self.rng.random() < 0.7:  # paid on the second try
            answers.append(await self.call("purchase.fulfill", paid_fulfil(created)))
        if any(answer and answer["purchase"]["state"] == "fulfilled" for answer in answers):
            self.owned.add(created["course"])

    async def registrations(self) -> None:
        await self.call("registration.list")

    async def batch(self) -> None:
        load = self.load
        items = [load.request("course.list"), load.request("registration.list")]
        for _ in range(self.rng.randint(0, 18)):
            if self.purchases:
                items.append(load.request("purchase.get", [self.rng.choice(self.purchases)]))
        items.append(load.request("purchase.list", {"limit": 10}))
        items.append(load.request("course.list", notify=True))
        self.rng.shuffle(items)
        await load.post(items, token=self.token)

    async def misbehave(self) -> None:
        if self.rng.random() < 0.5:
            await self.call("purchase.list", {"limit": 1000})
        else:
            await self.call("purchase.refund", {"purchase_id": "0" * 32})

    async def run(self, until: float) -> None:
        actions = (
            (self.browse, 10), (self.list_pages, 20), (self.look_up, 20), (self.check_out, 15),
            (self.registrations, 8), (self.batch, 10), (self.misbehave, 2),
        )  # fmt: skip
        steps, weights = zip(*actions, strict=True)
        while time.monotonic() < until:
            self.steps += 1
            await self.rng.choices(steps, weights)[0]()
            await asyncio.sleep(self.rng.uniform(0, 0.02))  # think time


class StaffDesk(Shopper):
    """The support desk: lists everyone's purchases and reads them."""

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            page = await self.call("purchase.list", {"limit": 20})
            for item in (page or {"items": []})["items"][:5]:
                await self.call("purchase.get", [item["purchase_id"]])
            await asyncio.sleep(self.rng.uniform(0.05, 0.2))


async def sample_rss(server: ServerProcess, samples: list[tuple[float, int]], until: float) -> None:
    while time.monotonic() < until:
        samples.append((time.monotonic(), server.rss_kib()))
        await asyncio.sleep(1.0)


async def test_mixed_frontend_load_soaks_without_errors_or_memory_growth(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    tokens = [world.alice.token, world.bob.token]
    for n in range(BUYERS - len(tokens)):
        tokens.append(await services.issue_token(uow_factory, f"buyer{n}@example.com"))
    courses = (world.python.slug, world.sql.slug)
    courses += tuple(await add_courses(engine, "soak", EXTRA_COURSES))
    sign_ups = itertools.count()

    async def sign_up() -> str:
        return await services.issue_token(uow_factory, f"new{next(sign_ups)}@example.com")

    rss: list[tuple[float, int]] = []

    with mail_server() as (smtp, mail):
        # Production defaults, the rate limit included (each shopper is far below it).
        env = server_env(database_url, tmp_path, smtp_url=smtp.url, rate_limit=None)
        server = ServerProcess(env, tmp_path / "server.log")
        async with started(server):
            async with contextlib.AsyncExitStack() as stack:
                loads = [
                    await stack.enter_async_context(RpcLoad(server.url)) for _ in range(BUYERS + 1)
                ]
                shoppers = [
                    Shopper(
                        load, token, f"s{n}", random.Random(n), courses=courses, sign_up=sign_up
                    )
                    for n, (load, token) in enumerate(zip(loads, tokens, strict=False))
                ]
                shoppers.append(StaffDesk(loads[-1], world.staff.token, "staff", random.Random(99)))
                started_at = time.monotonic()
                until = started_at + SOAK_SECONDS
                runs = [asyncio.create_task(shopper.run(until)) for shopper in shoppers]
                await asyncio.sleep(WARM_UP_SECONDS)
                await asyncio.gather(sample_rss(server, rss, until), *runs)
                elapsed = time.monotonic() - started_at
            snapshot = await eventually_all_sent(engine)
            await asyncio.sleep(0.3)
            exit_code = await server.stop()
        received = mail.message_ids()
    log = server.log()

    exchanges = [e for load in loads for e in load.exchanges]
    calls = sum(load.calls() for load in loads)
    codes: Counter[int] = Counter()
    for load in loads:
        codes.update(load.code_counts())
    transport_errors = Counter(e.error for e in exchanges if e.error)
    statuses = Counter(e.status for e in exchanges)
    malformed = [e for e in exchanges if e.problems]
    unexpected_codes = {code: n for code, n in codes.items() if code not in EXPECTED_CODES}
    values = [kib for _, kib in rss]
    third = max(1, len(values) // 3)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    growth = (last - first) / first
    latencies = sorted(e.finished - e.started for e in exchanges if e.answered)
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    expected_mail = {receipt_message_id(pid) for pid in snapshot.fulfilled}

    print(
        f"\n[soak {database_url.split(':')[0]}] {elapsed:.0f}s, {len(shoppers)} clients: "
        f"{calls} calls in {len(exchanges)} requests ({calls / elapsed:.0f} calls/s), "
        f"HTTP {dict(statuses)}, transport errors {dict(transport_errors)}, malformed "
        f"{len(malformed)}, error codes {dict(codes)}; p99 latency {p99 * 1000:.0f} ms; "
        f"purchases {dict(snapshot.states())}, receipts {dict(snapshot.outbox_statuses())}, "
        f"mail {sum(received.values())} for {len(received)} Message-IDs; RSS after "
        f"{WARM_UP_SECONDS:.0f}s warm-up, {len(values)} samples: first third median "
        f"{first / 1024:.1f} MiB, last third median {last / 1024:.1f} MiB "
        f"({growth:+.1%}), min {min(values) / 1024:.1f}, max {max(values) / 1024:.1f} MiB, "
        f"series (MiB) {[round(v / 1024, 1) for v in values[:: max(1, len(values) // 12)]]}; "
        f"tracebacks in log {log.count('Traceback')}"
    )

    assert len(values) >= 3, "too few memory samples"
    assert not any(s in range(500, 600) for s in statuses if s is not None), statuses
    assert transport_errors == Counter(), transport_errors
    assert malformed == [], [e.problems for e in malformed][:5]
    assert unexpected_codes == {}, unexpected_codes
    assert "Traceback" not in log, server.tail()
    assert snapshot.violations == [], snapshot.violations[:10]
    assert set(snapshot.outbox_statuses()) <= {"sent"}, snapshot.outbox_statuses()
    assert set(received) == expected_mail
    assert duplicates(received) == {}
    assert exit_code == 0, server.tail()
    assert growth <= MAX_RSS_GROWTH, f"RSS grew {growth:.1%}: {values}"
