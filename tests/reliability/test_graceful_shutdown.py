"""Graceful shutdown: SIGTERM under load finishes what is in flight and exits 0 in time.

A real ``rpc-server serve`` process (one, and ``--workers 2``: gunicorn) takes a load of slow
calls (batches of 100 ``purchase.get`` and of 50 ``purchase.list`` of 100, fulfills,
creates), each over a new connection, while its deliverer sends a backlog of receipts
to an SMTP server that holds every DATA for a while. SIGTERM comes when a receipt is in
DATA. Then: new connections are refused at once, while the calls in flight are still
being served; every request written before the signal is answered with HTTP 200 and a
valid JSON-RPC body (no reset, no 5xx); the receipt in DATA is accepted and its row
marked sent, no row is left claimed, no receipt was accepted without its row being
marked sent (it would be sent again); and the process exits 0 within
``RPC_SERVER_SHUTDOWN_TIMEOUT``.

Two harder cases: a call whose body is still arriving at SIGTERM (a slow client, a large
batch) is read to its end and answered, and the process exits once it is answered; a
mail server that hangs in DATA does not hold the process past the timeout (and the
receipt is not lost: the next server sends it, at worst twice with one Message-ID).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.records import Purchase
from tests.conftest import World
from tests.integration.paying import pay_and_fulfil, serialized
from tests.reliability.load import (
    Exchange,
    RpcLoad,
    ServerProcess,
    database_snapshot,
    eventually_all_sent,
    mail_server,
    paid_fulfil,
    receipt_message_id,
    server_env,
    started,
)

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 10.0
# Time from SIGTERM to exit beyond the timeout: interpreter exit, engine disposal.
EXIT_SLACK = 3.0
WORKERS = 12
SEEDED_PURCHASES = 100
PENDING_RECEIPTS = 30
SMTP_DATA_SECONDS = 0.4
# New connections are tried this long after SIGTERM.
PROBE_AFTER = 0.1
# Every worker has closed its listening socket this soon after SIGTERM.
STOP_ACCEPTING_WITHIN = 1.0
# The held call's body completes this long after SIGTERM; its server's timeout.
HELD_CALL_SECONDS = 1.0
HELD_SHUTDOWN_TIMEOUT = 5.0


async def seed(
    uow_factory: SqlUnitOfWorkFactory, world: World, *, purchases: int, fulfilled: int
) -> list[Purchase]:
    """``purchases`` pending purchases of alice's, the first ``fulfilled`` of them paid
    for and fulfilled (all created first: once registered, alice cannot buy the course
    again)."""
    made = [
        await services.create_purchase(uow_factory, world.alice.actor, course="sql-fundamentals")
        for _ in range(purchases)
    ]
    for purchase in made[:fulfilled]:
        await pay_and_fulfil(uow_factory, world.alice.actor, purchase)
    return made


async def connection_refused(port: int) -> bool:
    """True if a new TCP connection to ``port`` is refused."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the connection reached the accept queue just as the listening socket
        # was closed, which refuses it too.
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def first_refusal(port: int, *, within: float) -> float | None:
    """When (``time.monotonic``) a new connection was first refused; None: not ``within``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await connection_refused(port):
            return time.monotonic()
        await asyncio.sleep(0.01)
    return None


async def eventually(condition: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_finishes_in_flight_calls_and_exits_0(
    workers: int,
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    seeded = await seed(uow_factory, world, purchases=SEEDED_PURCHASES, fulfilled=PENDING_RECEIPTS)
    ids = [purchase.purchase_id for purchase in seeded]
    to_fulfill = [serialized(purchase) for purchase in seeded[PENDING_RECEIPTS:]]
    random.shuffle(to_fulfill)
    token = world.alice.token
    stop = asyncio.Event()
    counter = itertools.count()

    with mail_server(delay=SMTP_DATA_SECONDS) as (smtp, mail):
        env = server_env(
            database_url, tmp_path, smtp_url=smtp.url, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        server = ServerProcess(env, tmp_path / "server.log", "--workers", str(workers))
        async with RpcLoad(server.url, force_close=True) as load, started(server):

            async def one_call(n: int) -> Exchange:
                kind = n % 5
                if kind == 0:
                    batch = [load.request("purchase.get", [random.choice(ids)]) for _ in range(100)]
                    return await load.post(batch, token=token)
                if kind == 1:
                    lists = [load.request("purchase.list", {"limit": 100}) for _ in range(50)]
                    return await load.post(lists, token=token)
                if kind == 2:
                    return await load.call("purchase.list", {"limit": 100}, token=token)
                if kind == 3 and to_fulfill:
                    params = paid_fulfil(to_fulfill.pop())  # with the payment's proof
                    return await load.call("purchase.fulfill", params, token=token)
                return await load.call("purchase.create", {"course": "python-basics"}, token=token)

            async def worker() -> None:
                while not stop.is_set():
                    exchange = await one_call(next(counter))
                    if not exchange.answered:
                        await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            # One call held open by the client (headers and half its body sent) until new
            # connections are refused: whatever the timing of the load, at least one call
            # is certainly still in flight at the refusal, and it must still be answered.
            release = asyncio.Event()
            held_request = load.request("purchase.create", {"course": "python-basics"})
            held = asyncio.create_task(load.post(held_request, token=token, hold=release))
            try:
                await asyncio.sleep(1.0)
                # SIGTERM while a receipt is in DATA (and slow calls are running).
                await eventually(lambda: mail.in_data > 0, within=10, what="a receipt in DATA")
                server.terminate()
                terminated_at = time.monotonic()
                refused_at = await first_refusal(server.port, within=STOP_ACCEPTING_WITHIN)
                release.set()
                exit_code = await server.wait(within=SHUTDOWN_TIMEOUT + 30)
                exited_at = time.monotonic()
            finally:
                stop.set()
                release.set()
                await asyncio.gather(*tasks, held, return_exceptions=True)
            await asyncio.sleep(0.5)  # anything still arriving at the mail server
        deliveries = mail.deliveries
    snapshot = await database_snapshot(engine)

    exchanges = load.exchanges
    sent_before = [e for e in exchanges if e.sent is not None and e.sent < terminated_at]
    in_flight = [e for e in sent_before if not e.answered or e.finished > terminated_at]
    not_answered_well = [e for e in sent_before if e.status != 200 or e.problems]
    probed_at = refused_at or time.monotonic()
    # Requests after SIGTERM meet a server that is closing: refused, or answered in full.
    after_term = [e for e in exchanges if e.started > terminated_at]
    dropped_after_term = [e for e in after_term if not e.refused and e.status != 200]
    dropped_errors = Counter(e.error for e in dropped_after_term)
    after_probe = [e for e in exchanges if e.started > probed_at]
    answered_after_probe = [e for e in after_probe if not e.refused]
    finished_after_probe = [e for e in in_flight if e.finished > probed_at]
    in_data_at_term = [d for d in deliveries if d.data_started < terminated_at < d.accepted]
    started_after_term = [d for d in deliveries if d.data_started > terminated_at]
    sent_ids = {receipt_message_id(pid) for pid, r in snapshot.outbox.items() if r.status == "sent"}
    received = [d.message_id for d in deliveries]
    accepted_not_marked = set(received) - sent_ids
    marked_not_received = sent_ids - set(received)
    resent = {m for m in received if received.count(m) > 1}
    claimed = snapshot.claimed()
    shutdown_seconds = exited_at - terminated_at

    print(
        f"\n[graceful {database_url.split(':')[0]} workers={workers}] calls: {load.calls()} "
        f"in {len(exchanges)} requests; written before SIGTERM {len(sent_before)}, in flight "
        f"at SIGTERM {len(in_flight)} ({len(finished_after_probe)} answered after the "
        f"refused connection, the last {max(e.finished for e in in_flight) - terminated_at:.2f}s "
        f"after SIGTERM), not answered well "
        f"{len(not_answered_well)}; new connections refused "
        f"{probed_at - terminated_at:.2f}s after SIGTERM: {refused_at is not None}; requests "
        f"after SIGTERM {len(after_term)}, of them accepted then dropped "
        f"{len(dropped_after_term)} {dict(dropped_errors)}; after the refusal {len(after_probe)}, "
        f"accepted "
        f"{len(answered_after_probe)}; receipts in DATA at SIGTERM {len(in_data_at_term)}, "
        f"DATA started after SIGTERM {len(started_after_term)}, outbox "
        f"{dict(snapshot.outbox_statuses())}, left claimed {len(claimed)}, accepted but not "
        f"marked sent {len(accepted_not_marked)}; exit {exit_code} after {shutdown_seconds:.2f}s "
        f"(timeout {SHUTDOWN_TIMEOUT}s)"
    )

    # The fault: SIGTERM really came with calls and a receipt in flight.
    assert len(in_flight) >= 2, "fewer than two calls in flight at SIGTERM"
    assert in_data_at_term, "no receipt was in DATA at SIGTERM"
    # Stops accepting, yet serves what it has.
    assert refused_at is not None, "new connections still accepted a second after SIGTERM"
    assert answered_after_probe == [], [(e.status, e.error) for e in answered_after_probe][:5]
    assert finished_after_probe, "no call was still in flight when connections were refused"
    held_exchange = held.result()
    assert held_exchange.status == 200 and not held_exchange.problems, held_exchange
    assert not_answered_well == [], [(e.status, e.error, e.problems) for e in not_answered_well][:5]
    assert load.server_errors() == [] and load.malformed() == []
    # The deliverer finished its message, recorded it, and left nothing claimed.
    assert claimed == set(), claimed
    assert accepted_not_marked == set(), accepted_not_marked
    assert marked_not_received == set(), marked_not_received
    assert resent == set(), resent
    assert snapshot.violations == [], snapshot.violations[:10]
    # Exits 0, in time.
    assert exit_code == 0, server.tail()
    assert shutdown_seconds <= SHUTDOWN_TIMEOUT + EXIT_SLACK


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_waits_for_a_call_whose_body_is_still_arriving(
    workers: int, database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    """A call in flight at SIGTERM whose body is still arriving (a slow client, a large
    batch) is read to its end and answered; the process exits once it is answered (with
    ``--workers``, the worker that has the call, and then gunicorn's arbiter)."""
    env = server_env(database_url, tmp_path, shutdown_timeout=HELD_SHUTDOWN_TIMEOUT)
    server = ServerProcess(env, tmp_path / "server.log", "--workers", str(workers))
    release = asyncio.Event()
    async with RpcLoad(server.url) as load, started(server):
        request = load.request("purchase.create", {"course": "python-basics"})
        held = asyncio.create_task(load.post(request, token=world.alice.token, hold=release))
        try:
            await eventually(lambda: bool(load.exchanges and load.exchanges[0].sent), within=5,
                             what="the request headers")  # fmt: skip
            await asyncio.sleep(0.3)  # the server has read the headers and half the body
            server.terminate()
            terminated_at = time.monotonic()
            await asyncio.sleep(PROBE_AFTER)
            refused = await connection_refused(server.port)
            await asyncio.sleep(terminated_at + HELD_CALL_SECONDS - time.monotonic())
            release.set()
            exchange = await held
            answered_after = time.monotonic() - terminated_at
            exit_code = await server.wait(within=HELD_SHUTDOWN_TIMEOUT + 30)
            shutdown_seconds = time.monotonic() - terminated_at
        finally:
            release.set()
            await asyncio.gather(held, return_exceptions=True)
    purchases = (await database_snapshot(engine)).purchases

    print(
        f"\n[held call {database_url.split(':')[0]} workers={workers}] body completed "
        f"{HELD_CALL_SECONDS}s after SIGTERM; new connection refused: {refused}; the call: "
        f"HTTP {exchange.status} {exchange.error or ''} after {answered_after:.2f}s; "
        f"exit {exit_code} after {shutdown_seconds:.2f}s (timeout {HELD_SHUTDOWN_TIMEOUT}s)"
    )
    assert refused
    assert exit_code == 0, server.tail()
    assert exchange.status == 200 and not exchange.problems, exchange
    assert exchange.result()["purchase_id"] in purchases
    # Once the last call is answered the process goes: it does not sit out the timeout.
    assert shutdown_seconds <= HELD_CALL_SECONDS + EXIT_SLACK


HUNG_SHUTDOWN_TIMEOUT = 2.0
HUNG_SMTP_SECONDS = 10.0


async def test_sigterm_while_the_mail_server_hangs_still_exits_within_the_timeout(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    """A receipt stuck in DATA does not hold the process past the shutdown timeout,
    and is not lost: the next server delivers it (at worst a second time)."""
    [purchase] = await seed(uow_factory, world, purchases=1, fulfilled=1)
    purchase_id = purchase.purchase_id
    with mail_server(delay=HUNG_SMTP_SECONDS) as (smtp, mail):
        env = server_env(
            database_url,
            tmp_path,
            smtp_url=smtp.url,
            shutdown_timeout=HUNG_SHUTDOWN_TIMEOUT,
            mail_lease=1,
        )
        server = ServerProcess(env, tmp_path / "server.log")
        async with started(server):
            await eventually(lambda: mail.in_data > 0, within=10, what="the receipt in DATA")
            server.terminate()
            terminated_at = time.monotonic()
            exit_code = await server.wait(within=HUNG_SMTP_SECONDS + 30)
            shutdown_seconds = time.monotonic() - terminated_at
        after_exit = (await database_snapshot(engine)).outbox[purchase_id]

        # The next server (the mail server answers at once now) sends what is left.
        mail.delay = 0.0
        async with started(ServerProcess(env, tmp_path / "next.log")) as next_server:
            snapshot = await eventually_all_sent(engine, within=20)
            assert await next_server.stop() == 0
        received = mail.message_ids()

    print(
        f"\n[hung smtp {database_url.split(':')[0]}] exit {exit_code} after "
        f"{shutdown_seconds:.2f}s (timeout {HUNG_SHUTDOWN_TIMEOUT}s, DATA held "
        f"{HUNG_SMTP_SECONDS}s); row after exit {after_exit.status} (attempts "
        f"{after_exit.attempts}), then {snapshot.outbox[purchase_id].status}; received "
        f"{received[receipt_message_id(purchase_id)]}x"
    )
    assert exit_code == 0, server.tail()
    assert after_exit.status in ("pending", "sent"), after_exit
    assert snapshot.outbox[purchase_id].status == "sent"
    assert received[receipt_message_id(purchase_id)] >= 1
    assert shutdown_seconds <= HUNG_SHUTDOWN_TIMEOUT + EXIT_SLACK, (
        f"SIGTERM took {shutdown_seconds:.1f}s with a hung mail server "
        f"(RPC_SERVER_SHUTDOWN_TIMEOUT={HUNG_SHUTDOWN_TIMEOUT})"
    )
