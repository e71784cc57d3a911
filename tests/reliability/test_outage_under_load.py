"""A PostgreSQL outage under load, with the deliverer running: -32000, 503, and recovery.

A real ``rpc-server serve`` process reaches PostgreSQL through a ``TcpProxy``. Shoppers
create, pay for and fulfill (with the payment's signed proof) and read purchases, each
of another course (retrying a call answered -32000 the way a frontend
would), ``/readyz`` is polled, and the deliverer works through a backlog of receipts on
an SMTP server that is slow to accept them. Then the proxy is cut for a few seconds:
every open database connection dies and new ones are refused.

Checked: during the outage calls answer -32000 (never -32603, a 5xx or a dropped
connection) and ``/readyz`` 503; afterwards both recover by themselves (no restart),
the receipts that were pending when the database went away are delivered, each exactly
once by Message-ID (a receipt accepted by the SMTP server while its row could not be
marked sent may be sent again, by design; any other duplicate is a bug), and the
database holds exactly one registration and receipt per fulfilled purchase, every
answered success included.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.jsonrpc.errors import SERVICE_UNAVAILABLE
from tests.conftest import World
from tests.reliability.load import (
    RpcLoad,
    ServerProcess,
    add_courses,
    database_snapshot,
    duplicates,
    eventually_all_sent,
    mail_server,
    paid_fulfil,
    receipt_message_id,
    server_env,
    started,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.backends("postgresql"), pytest.mark.slow]

WORKERS = 10
LOAD_BEFORE_OUTAGE = 2.0
OUTAGE_SECONDS = 3.0
RECOVERY_WITHIN = 10.0
LOAD_AFTER_RECOVERY = 2.0
# DATA held this long until the database is back: receipts pile up in the outbox.
SLOW_SMTP_SECONDS = 0.1
# A call answered -32000 is retried after this long.
RETRY_AFTER = 0.1
# Settling a receipt may fail this close to the outage (its commit in flight).
SETTLE_GRACE = 1.0
# One course per purchase the shoppers make (more than a run makes).
COURSES = 3000


async def poll_readiness(
    url: str, seen: list[tuple[float, int | None]], stop: asyncio.Event
) -> None:
    """GET /readyz every 0.1 s; record (when, status) (None: no HTTP answer)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            status: int | None = None
            try:
                async with session.get(f"{url}/readyz") as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            seen.append((time.monotonic(), status))
            await asyncio.sleep(0.1)


async def test_postgres_outage_under_load_recovers_by_itself_and_delivers_every_receipt(
    database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied_url = url.set(port=proxy.port).render_as_string(hide_password=False)
    stop = asyncio.Event()
    readiness: list[tuple[float, int | None]] = []
    tokens = (world.alice.token, world.bob.token)
    courses = deque(await add_courses(engine, "outage", COURSES))

    with mail_server(delay=SLOW_SMTP_SECONDS) as (smtp, mail):
        env = server_env(
            proxied_url, tmp_path, smtp_url=smtp.url,
            db_connect_timeout=1, db_pool_timeout=2, mail_lease=3,
            # On PostgreSQL the rate limiter's buckets live in the database too, and it
            # must fail open, not fail the calls. It runs as in production (the default
            # rate), with a burst the load never exhausts: any 429 here would be the
            # limiter failing closed, not the load being over its limit.
            rate_limit=None, rate_burst=1_000_000,
        )  # fmt: skip
        server = ServerProcess(env, tmp_path / "server.log")
        try:
            async with RpcLoad(server.url, timeout=30) as load, started(server):

                async def until_answered(method: str, params: Any, token: str) -> Any:
                    """The call's result, retried while the service is unavailable."""
                    while True:
                        exchange = await load.call(method, params, token=token)
                        if exchange.result() is not None:
                            return exchange.result()
                        if exchange.error_codes() != [SERVICE_UNAVAILABLE] or stop.is_set():
                            return None
                        await asyncio.sleep(RETRY_AFTER)

                async def shopper(number: int) -> None:
                    token = tokens[number % 2]
                    for step in itertools.count():
                        if stop.is_set() or not courses:
                            return
                        key = f"{number}-{step}"
                        params = {"course": courses.popleft(), "idempotency_key": key}
                        created = await until_answered("purchase.create", params, token)
                        if created is None:
                            continue
                        purchase_id = created["purchase_id"]
                        fulfill = paid_fulfil(created)  # the same proof on every retry
                        await until_answered("purchase.fulfill", fulfill, token)
                        await until_answered("purchase.get", [purchase_id], token)

                tasks = [asyncio.create_task(shopper(n)) for n in range(WORKERS)]
                tasks.append(asyncio.create_task(poll_readiness(server.url, readiness, stop)))
                try:
                    await asyncio.sleep(LOAD_BEFORE_OUTAGE)
                    pending_at_cut = {
                        pid
                        for pid, row in (await database_snapshot(engine)).outbox.items()
                        if row.status == "pending"
                    }
                    await proxy.stop()
                    cut_at = time.monotonic()
                    await asyncio.sleep(OUTAGE_SECONDS)
                    await proxy.start()
                    restored_at = time.monotonic()
                    mail.delay = 0.0
                    recovered_at = await recovery(load, readiness, restored_at)
                    await asyncio.sleep(LOAD_AFTER_RECOVERY)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                snapshot = await eventually_all_sent(engine)
                await asyncio.sleep(0.5)  # a late duplicate would arrive now
                deliveries = mail.deliveries
                exit_code = await server.stop()
        finally:
            await proxy.stop()

    exchanges = load.exchanges
    codes = load.code_counts()
    during = [e for e in exchanges if e.started >= cut_at + 0.5 and e.finished <= restored_at]
    succeeded_during = [e for e in during if e.result() is not None]
    unavailable = [e for e in exchanges if SERVICE_UNAVAILABLE in e.error_codes()]
    late_unavailable = [e for e in unavailable if e.started > recovered_at + 1.0]
    transport_errors = [e for e in exchanges if e.error]
    ready_during = [s for t, s in readiness if cut_at + 0.5 <= t <= restored_at]
    ready_statuses = {s for _, s in readiness}
    answered_states = {
        e.result()["purchase"]["purchase_id"]: e.result()["purchase"]["state"]
        for e in exchanges
        if e.result() is not None and e.payload["method"] == "purchase.fulfill"
    }
    lost = {pid for pid, state in answered_states.items() if snapshot.purchases.get(pid) != state}
    received = mail.message_ids()
    first_accepted: dict[str, float] = {}
    for delivery in deliveries:
        first_accepted.setdefault(delivery.message_id, delivery.accepted)
    in_window = {
        m
        for m, t in first_accepted.items()
        if cut_at - SETTLE_GRACE <= t <= restored_at + SETTLE_GRACE
    }
    duplicate_mail = duplicates(received)
    expected_mail = {receipt_message_id(pid) for pid in snapshot.fulfilled}
    pending_delivered_after = {
        pid
        for pid in pending_at_cut
        if first_accepted.get(receipt_message_id(pid), 0) > restored_at
    }

    print(
        f"\n[outage postgresql] calls: {load.calls()}; outage {OUTAGE_SECONDS}s under load: "
        f"{len(unavailable)} answered -32000, {len(during)} calls wholly inside it "
        f"({len(succeeded_during)} succeeded), error codes {dict(codes)}, transport errors "
        f"{len(transport_errors)}, 5xx {len(load.server_errors())}, malformed "
        f"{len(load.malformed())}; /readyz during {sorted(set(ready_during), key=str)}, "
        f"statuses {sorted(ready_statuses, key=str)}; recovered "
        f"{recovered_at - restored_at:.2f}s after the database came back, -32000 after that "
        f"{len(late_unavailable)}; receipts pending at the cut {len(pending_at_cut)}, of them "
        f"delivered after recovery {len(pending_delivered_after)}; purchases "
        f"{dict(snapshot.states())}, outbox {dict(snapshot.outbox_statuses())}; mail "
        f"{sum(received.values())} for {len(received)} Message-IDs, duplicates "
        f"{len(duplicate_mail)} ({len(set(duplicate_mail) - in_window)} outside the outage); "
        f"violations {len(snapshot.violations)}, lost answers {len(lost)}; exit {exit_code}"
    )

    # The outage happened, under load, and was seen as it should be.
    assert unavailable, "no call answered -32000"
    assert during and not succeeded_during, "calls succeeded while the database was cut"
    assert 503 in ready_during, "/readyz did not answer 503 during the outage"
    assert pending_at_cut, "no receipt was pending when the database went away"
    # Only -32000: no internal error, no 5xx, no dropped connection, nothing malformed.
    assert set(codes) == {SERVICE_UNAVAILABLE}, codes
    assert transport_errors == [], [(e.error, e.payload) for e in transport_errors][:5]
    assert load.server_errors() == [] and load.malformed() == []
    assert ready_statuses <= {200, 503}, ready_statuses
    # Recovered by itself.
    assert late_unavailable == [], len(late_unavailable)
    assert readiness[-1][1] == 200
    # Nothing lost, nothing doubled.
    assert snapshot.violations == [], snapshot.violations[:10]
    assert lost == set(), lost
    assert set(snapshot.outbox_statuses()) == {"sent"}, snapshot.outbox_statuses()
    assert set(received) == expected_mail
    assert pending_delivered_after, "no receipt pending at the cut was delivered afterwards"
    assert set(duplicate_mail) <= in_window, duplicate_mail
    assert exit_code == 0, server.tail()


async def recovery(
    load: RpcLoad, readiness: list[tuple[float, int | None]], restored_at: float
) -> float:
    """When both /readyz and the calls answered successfully again after ``restored_at``."""
    deadline = restored_at + RECOVERY_WITHIN
    while time.monotonic() < deadline:
        ready = any(t > restored_at and s == 200 for t, s in readiness)
        calls = any(e.started > restored_at and e.result() is not None for e in load.exchanges)
        if ready and calls:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"not recovered {RECOVERY_WITHIN}s after the database came back")
