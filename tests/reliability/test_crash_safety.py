"""Crash safety: ``kill -9`` the server under concurrent fulfills, restart it, lose nothing.

A real ``rpc-server serve`` process on the test's database (SQLite, and PostgreSQL when
configured) takes a load of concurrent ``purchase.fulfill`` calls (two callers per
purchase, some racing a cancel, some by the support desk; a buyer's fulfil carries a
signed proof of payment) and of create-then-fulfill flows (each of a course the buyer
does not have yet: one cannot buy a course twice), while its deliverer sends receipts to
a real SMTP server that is slow to accept them, so a batch of receipts is claimed when
the process is killed with SIGKILL. The load goes on against the dead port (refused), a
new process starts on the same database and port, the load goes on, then every call
that got no answer is retried the way a frontend would (same params, same idempotency
key).

Then, over the whole database: every fulfilled purchase has exactly one registration
and one receipt row, nothing belongs to a purchase that is not fulfilled, every
purchase's audit trail agrees with its state and the event seqs have no gap, every answer
that said "fulfilled" (or "canceled", or "created") is in the database, and every
receipt reached the SMTP server, at least once, and more than once only if its row was
claimed by the killed process (a crash between SMTP acceptance and marking it sent may
resend it, with the same Message-ID, by design).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World
from tests.integration.paying import serialized
from tests.reliability.load import (
    Exchange,
    RpcLoad,
    ServerProcess,
    TimedHandler,
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

pytestmark = pytest.mark.slow

WORKERS = 16
SEEDED_PURCHASES = 150
LOAD_BEFORE_KILL = 2.0
DOWNTIME = 0.5
LOAD_AFTER_RESTART = 2.0
# DATA held this long before the kill: the deliverer is mid-batch when it dies.
SLOW_SMTP_SECONDS = 0.3
MAIL_LEASE = 2.0
# Error codes a call of this load may answer with: a cancel and a fulfill racing.
EXPECTED_CODES = {409}
# Courses for the create-then-fulfill flows, one per flow (more than a run makes).
FLOW_COURSES = 3000


def fulfill_params(exchange: Exchange) -> dict[str, Any] | None:
    payload = exchange.payload
    if isinstance(payload, dict) and payload.get("method") == "purchase.fulfill":
        params: dict[str, Any] = payload["params"]
        return params
    return None


async def until_mid_call_and_mid_send(load: RpcLoad, mail: TimedHandler) -> None:
    """Wait (10 s at most) until some request has been written and not yet answered, and
    a receipt is in DATA (so the deliverer holds a claim): not in a gap between calls, nor
    between two claims (the deliverer settles one and claims the next)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if mail.in_data and any(e.sent is not None and not e.finished for e in load.exchanges):
            return
        await asyncio.sleep(0.002)


async def test_kill_9_under_concurrent_fulfills_loses_and_duplicates_nothing(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    buyers = (world.alice, world.bob)
    seeded: list[tuple[str, int]] = []
    # purchase_id -> what a payment for it repeats (purchase_id, amount, currency)
    priced: dict[str, dict[str, Any]] = {}
    for n in range(SEEDED_PURCHASES):
        buyer = buyers[n % 2]
        course = (world.python, world.sql)[n % 3 == 0].slug
        purchase = await services.create_purchase(uow_factory, buyer.actor, course=course)
        seeded.append((purchase.purchase_id, n % 2))
        priced[purchase.purchase_id] = serialized(purchase)
    flow_courses = deque(await add_courses(engine, "flow", FLOW_COURSES))
    # Each purchase twice in a row: two workers fulfill it at about the same time.
    targets = deque(item for item in seeded for item in (item, item))
    counter = itertools.count()
    stop = asyncio.Event()
    # Creates that got no answer, retried after the restart with the same key.
    unanswered_creates: list[tuple[str, int, str]] = []

    with mail_server(delay=SLOW_SMTP_SECONDS) as (smtp, mail):
        env = server_env(database_url, tmp_path, smtp_url=smtp.url, mail_lease=MAIL_LEASE)
        first = ServerProcess(env, tmp_path / "first.log")
        second = ServerProcess(env, tmp_path / "second.log", port=first.port)
        async with (
            RpcLoad(first.url, force_close=True, timeout=30) as load,
            started(first),
        ):

            async def fulfill(purchase_id: str, buyer: int, state: str, n: int) -> Exchange:
                params: dict[str, Any] = {"purchase_id": purchase_id, "purchase_state": state}
                if n % 5 == 0:
                    token = world.staff.token  # the support desk: no proof (a comp)
                else:
                    token = buyers[buyer].token
                    if state == "fulfilled":  # the buyer paid: the proof goes along
                        params = paid_fulfil(priced[purchase_id])
                return await load.call("purchase.fulfill", params, token=token)

            async def create_and_fulfill(worker: int, n: int, course: str) -> Exchange:
                key, buyer = f"crash-{worker}-{n}", n % 2
                params = {"course": course, "idempotency_key": key}
                created = await load.call("purchase.create", params, token=buyers[buyer].token)
                if created.result() is None:
                    unanswered_creates.append((key, buyer, course))
                    return created
                purchase = created.result()
                priced[purchase["purchase_id"]] = purchase
                return await fulfill(purchase["purchase_id"], buyer, "fulfilled", n)

            async def worker(number: int) -> None:
                while not stop.is_set():
                    n = next(counter)
                    if (n % 3 == 0 or not targets) and flow_courses:
                        last = await create_and_fulfill(number, n, flow_courses.popleft())
                    elif not targets:
                        await asyncio.sleep(0.05)  # nothing left to do
                        continue
                    else:
                        purchase_id, buyer = targets.popleft()
                        # The second caller of every seventh purchase cancels it instead.
                        second_caller = not targets or targets[0][0] != purchase_id
                        racing_cancel = int(purchase_id, 16) % 7 == 0 and second_caller
                        state = "canceled" if racing_cancel else "fulfilled"
                        last = await fulfill(purchase_id, buyer, state, n)
                    if not last.answered:
                        await asyncio.sleep(0.05)  # the server is down: do not spin

            async def retry(exchange: Exchange) -> list[Exchange]:
                """The same call again, as a frontend does when it got no answer."""
                async with retry_slots:
                    params = fulfill_params(exchange)
                    if params is not None:
                        # Staff may fulfill anyone's purchase (and a buyer's proof, sent
                        # again with it, still verifies).
                        request = load.request("purchase.fulfill", params)
                        return [await load.post(request, token=world.staff.token)]
                    return []

            async def retry_create(key: str, buyer: int, course: str) -> list[Exchange]:
                async with retry_slots:
                    params = {"course": course, "idempotency_key": key}
                    created = await load.call("purchase.create", params, token=buyers[buyer].token)
                    if created.result() is None:
                        return [created]
                    params = paid_fulfil(created.result())
                    token = buyers[buyer].token
                    return [created, await load.call("purchase.fulfill", params, token=token)]

            retry_slots = asyncio.Semaphore(WORKERS)
            workers = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
            try:
                await asyncio.sleep(LOAD_BEFORE_KILL)
                # Kill while a call is on the wire and a receipt is being sent.
                await until_mid_call_and_mid_send(load, mail)
                in_data_at_kill = mail.in_data
                first.kill()
                killed_at = time.monotonic()
                assert await first.wait() == -9
                at_kill = await database_snapshot(engine)
                claimed_at_kill = at_kill.claimed()
                mail.delay = 0.0
                await asyncio.sleep(DOWNTIME)

                await second.start()
                restarted_at = time.monotonic()
                await asyncio.sleep(LOAD_AFTER_RESTART)
                stop.set()
                await asyncio.gather(*workers)

                # Every call that got no answer, once more (each distinct call once).
                unanswered = {
                    repr(fulfill_params(e)): e
                    for e in load.exchanges
                    if fulfill_params(e) is not None and not e.answered
                }
                retries = [retry(e) for e in unanswered.values()]
                retries += [retry_create(*create) for create in set(unanswered_creates)]
                retried = [e for done in await asyncio.gather(*retries) for e in done]

                snapshot = await eventually_all_sent(engine)
                # A little longer: a late duplicate would show up now.
                await asyncio.sleep(0.5)
                received = mail.message_ids()
                exit_code = await second.stop()
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
                await second.close()

    exchanges = load.exchanges
    before_kill = [e for e in exchanges if e.finished <= killed_at]
    cut = [e for e in exchanges if e.cut and e.sent is not None and e.sent < killed_at]
    refused = [e for e in exchanges if e.refused]
    after_restart = [e for e in exchanges if e.started >= restarted_at and e.result()]
    codes = load.code_counts()
    answered_states: dict[str, set[str]] = {}
    created_ids = set()
    for exchange in exchanges:
        result = exchange.result()
        if result is None:
            continue
        if fulfill_params(exchange) is not None:
            purchase = result["purchase"]
            answered_states.setdefault(purchase["purchase_id"], set()).add(purchase["state"])
        elif isinstance(exchange.payload, dict) and exchange.payload["method"] == "purchase.create":
            created_ids.add(result["purchase_id"])
    lost = {
        pid: states
        for pid, states in answered_states.items()
        if states != {snapshot.purchases.get(pid)}
    }
    lost_creates = created_ids - set(snapshot.purchases)
    fulfilled = snapshot.fulfilled
    expected_ids = {receipt_message_id(pid) for pid in fulfilled}
    missing_mail = expected_ids - set(received)
    unexpected_mail = set(received) - expected_ids
    duplicate_mail = duplicates(received)
    allowed_duplicates = {receipt_message_id(pid) for pid in claimed_at_kill}
    # What the database held right after the kill, against what had been answered by then.
    answered_by_kill = {
        e.result()["purchase"]["purchase_id"]: e.result()["purchase"]["state"]
        for e in before_kill
        if e.result() is not None and fulfill_params(e) is not None
    }
    not_durable_at_kill = {
        pid: state for pid, state in answered_by_kill.items() if at_kill.purchases.get(pid) != state
    }
    committed_unanswered = at_kill.fulfilled - {
        pid for pid, state in answered_by_kill.items() if state == "fulfilled"
    }

    print(
        f"\n[crash {database_url.split(':')[0]}] calls: {load.calls()} "
        f"(before kill {len(before_kill)}, answered after restart {len(after_restart)}, "
        f"retried {len(retried)}); kill -9 cut {len(cut)} calls in flight, "
        f"{len(refused)} refused while down; error codes {dict(codes)}; "
        f"receipts claimed at kill {len(claimed_at_kill)}, in DATA at kill {in_data_at_kill}; "
        f"purchases {dict(snapshot.states())}; fulfilled at the kill "
        f"{len(at_kill.fulfilled)} ({len(committed_unanswered)} committed but unanswered, "
        f"{len(not_durable_at_kill)} answered but not durable, violations "
        f"{len(at_kill.violations)}); outbox {dict(snapshot.outbox_statuses())}; "
        f"messages received {sum(received.values())} for {len(received)} Message-IDs, "
        f"duplicates {len(duplicate_mail)} (allowed: claimed at kill); "
        f"violations {len(snapshot.violations)}, lost answers {len(lost) + len(lost_creates)}, "
        f"missing mail {len(missing_mail)}, unexpected mail {len(unexpected_mail)}"
    )

    # The fault really happened mid-load, and the restart really served.
    assert before_kill and any(e.result() for e in before_kill)
    assert cut, "no call was in flight when the server was killed"
    assert refused, "no call hit the dead server"
    assert claimed_at_kill, "the deliverer held no claimed receipts when it was killed"
    assert after_restart, "the restarted server answered nothing"
    assert exit_code == 0, second.tail()
    # Answers: well-formed, no 5xx, no internal errors; every retry answered.
    assert not load.malformed(), [e.problems for e in load.malformed()][:5]
    assert set(codes) <= EXPECTED_CODES, codes
    assert all(e.answered and not e.problems for e in retried), [
        (e.error, e.body) for e in retried if not e.answered or e.problems
    ][:5]
    # The database: exactly once, nothing orphaned, every success durable.
    assert at_kill.violations == [], at_kill.violations[:10]
    assert not_durable_at_kill == {}, not_durable_at_kill
    assert snapshot.violations == [], snapshot.violations[:10]
    assert lost == {}, lost
    assert lost_creates == set(), lost_creates
    assert set(snapshot.outbox_statuses()) == {"sent"}, snapshot.outbox_statuses()
    # The mail: every receipt arrived; more than once only if claimed at the kill.
    assert missing_mail == set(), sorted(missing_mail)[:5]
    assert unexpected_mail == set(), sorted(unexpected_mail)[:5]
    assert set(duplicate_mail) <= allowed_duplicates, duplicate_mail
