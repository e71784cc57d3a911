"""Live purchase updates across real ``rpc-server serve`` processes on one PostgreSQL database.

Two processes share one migrated database (each test its own, made from the session's
template); WebSockets, webhooks and calls go over real sockets. The proofs:

- A subscriber on process A sees a fulfilment made through the webhook on process B
  within a second of the webhook's answer, exactly once (NOTIFY/LISTEN, not a poll).
- Resuming: a subscriber notes the last seq it got and disconnects; 100 state changes
  are made over both processes; it reconnects with ``since`` while more changes are
  being made, and gets exactly the 100 in order, then the live ones, none twice.
- The LISTEN connection of every process killed (``pg_terminate_backend``) while changes
  are being made: it is opened again, and every subscriber still gets every event, in
  order, exactly once.
- A reader that subscribes and then never reads, while thousands of events flow: the
  server ends its connection, the process's RSS stays within 50 MiB of where it was,
  and a subscriber that reads meanwhile gets every event.
- A socket that never authenticates is closed 1008 within the auth timeout; SIGTERM
  closes the open sockets with 1001 and the process exits 0.

Every wait has a deadline; the only figures printed are measurements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.live.listener import APPLICATION_NAME
from tests.conftest import World
from tests.live_client import (
    GOING_AWAY,
    OPCODE_TEXT,
    POLICY_VIOLATION,
    LiveClient,
    RawPeer,
    bearer,
    close_code_of,
)
from tests.payments import proof_for, webhook_request
from tests.reliability.load import ServerProcess, add_courses, server_env, started

pytestmark = pytest.mark.backends("postgresql")  # NOTIFY/LISTEN across processes

# How late a timer-driven close may come past its setting, on a loaded machine.
SLACK = 1.5
# The bound on a process's memory growth while a reader stalls.
RSS_GROWTH_BOUND_KIB = 50 * 1024


# --- helpers ------------------------------------------------------------------------------


async def call(
    session: aiohttp.ClientSession, server: ServerProcess, payload: Any, token: str
) -> Any:
    """POST ``payload`` to the server's /rpc; return the parsed answer."""
    async with session.post(f"{server.url}/rpc", json=payload, headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def result(
    session: aiohttp.ClientSession, server: ServerProcess, method: str, params: Any, token: str
) -> Any:
    answer = await call(session, server, {"jsonrpc": "2.0", "method": method, "params": params,
                                          "id": 1}, token)  # fmt: skip
    assert "result" in answer, answer
    return answer["result"]


async def create(
    session: aiohttp.ClientSession, server: ServerProcess, token: str, course: str
) -> dict[str, Any]:
    purchase: dict[str, Any] = await result(
        session, server, "purchase.create", {"course": course}, token
    )
    return purchase


async def fulfil(
    session: aiohttp.ClientSession, server: ServerProcess, world: World, purchase_id: str
) -> None:
    """Fulfil with the payment backend's token."""
    params = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    done = await result(session, server, "purchase.fulfill", params, world.payments.token)
    assert done["purchase"]["state"] == "fulfilled", done


@asynccontextmanager
async def socket_to(
    session: aiohttp.ClientSession, server: ServerProcess, token: str | None = None
) -> AsyncIterator[LiveClient]:
    ws = await session.ws_connect(
        f"{server.url}/rpc", headers=bearer(token) if token else {}, autoping=True
    )
    async with LiveClient(ws) as socket:
        yield socket


async def seqs_after(engine: AsyncEngine, after: int) -> list[int]:
    """The seq of every event committed after ``after``, in order, as the database has them."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT seq FROM purchase_events WHERE seq > :after ORDER BY seq"),
            {"after": after},
        )
        return [int(seq) for (seq,) in rows]


async def latest_seq(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        latest = await connection.execute(text("SELECT coalesce(max(seq), 0) FROM purchase_events"))
        return int(latest.scalar_one())


# The server's dedicated LISTEN connections to this test's database, found by the
# application name they give themselves (their last statement may be a liveness check,
# not the LISTEN).
LISTENERS = (
    "FROM pg_stat_activity WHERE datname = current_database() "
    f"AND application_name = '{APPLICATION_NAME}'"
)


async def listener_pids(engine: AsyncEngine) -> set[int]:
    async with engine.connect() as connection:
        return {int(pid) for (pid,) in await connection.execute(text(f"SELECT pid {LISTENERS}"))}


async def kill_listeners(engine: AsyncEngine) -> set[int]:
    """Terminate every LISTEN connection to the database; return the pids ended."""
    async with engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT pid, pg_terminate_backend(pid) {LISTENERS}"))
        return {int(pid) for pid, ended in rows if ended}


async def listeners_back(
    engine: AsyncEngine, killed: set[int], count: int, within: float
) -> set[int]:
    """Wait until ``count`` LISTEN connections are open again, none of them a killed one."""
    deadline = time.monotonic() + within
    while True:
        pids = await listener_pids(engine)
        if len(pids) >= count and not pids & killed:
            return pids
        assert time.monotonic() < deadline, f"listeners not back within {within}s: {pids}"
        await asyncio.sleep(0.05)


def two_servers(database_url: str, tmp_path: Path) -> tuple[ServerProcess, ServerProcess]:
    """Two server processes on one database (each its own port and log)."""
    env = server_env(database_url, tmp_path)
    return ServerProcess(env, tmp_path / "a.log"), ServerProcess(env, tmp_path / "b.log")


# --- (a) across processes ---------------------------------------------------------------


async def test_a_webhook_fulfilment_on_one_process_reaches_a_subscriber_on_another_in_a_second(
    database_url: str, world: World, tmp_path: Path
) -> None:
    first, second = two_servers(database_url, tmp_path)
    async with started(first), started(second), aiohttp.ClientSession() as session:
        purchase = await create(session, second, world.alice.token, "python-basics")
        async with socket_to(session, first, world.alice.token) as alice:
            await alice.subscribe()
            headers, body = webhook_request(proof_for(purchase, payment_ref="pi_across"))
            async with session.post(
                f"{second.url}/webhooks/payments", data=body, headers=headers
            ) as response:
                assert response.status == 200
                assert (await response.json())["status"] == "applied"
            committed = time.monotonic()
            [update] = await alice.updates_at_least(1, within=5)
            delay = alice.notification_arrivals[0] - committed
            print(f"\nwebhook on B -> notification on A: {delay * 1000:.0f} ms")
            assert delay < 1.0, delay
            assert update["purchase"]["purchase_id"] == purchase["purchase_id"]
            assert update["purchase"]["state"] == "fulfilled"
            assert (update["event"]["to_state"], update["event"]["source"]) == (
                "fulfilled",
                "webhook",
            )
            assert update["event"]["payment_ref"] == "pi_across"

            # The provider delivers it again: no change, so no update. The next update
            # is the next change, so a duplicate would have come before it.
            async with session.post(
                f"{second.url}/webhooks/payments", data=body, headers=headers
            ) as response:
                assert response.status == 200
            marker = await create(session, second, world.alice.token, "sql-fundamentals")
            updates = await alice.updates_at_least(2)
            assert [u["purchase"]["purchase_id"] for u in updates] == [
                purchase["purchase_id"],
                marker["purchase_id"],
            ]
            assert updates[1]["seq"] > updates[0]["seq"]
        assert await first.stop() == 0
        assert await second.stop() == 0


# --- (b) resuming with since ------------------------------------------------------------


async def test_resuming_with_since_gets_exactly_the_missed_events_in_order_then_live_ones(
    database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    missed_courses = await add_courses(engine, "missed", 50)
    live_courses = await add_courses(engine, "live", 20)
    first, second = two_servers(database_url, tmp_path)
    async with started(first), started(second), aiohttp.ClientSession() as session:
        async with socket_to(session, first, world.alice.token) as alice:
            await alice.subscribe()
            await create(session, first, world.alice.token, "python-basics")
            [update] = await alice.updates_at_least(1)
            last_seen = update["seq"]

        # Away: 100 changes (50 purchases made and fulfilled), over both processes.
        for n, course in enumerate(missed_courses):
            made_on, paid_on = (first, second) if n % 2 else (second, first)
            purchase = await create(session, made_on, world.alice.token, course)
            await fulfil(session, paid_on, world, purchase["purchase_id"])
        missed = await seqs_after(engine, last_seen)
        assert len(missed) == 100

        async with socket_to(session, second, world.alice.token) as alice:
            subscription = await alice.subscribe(since=last_seen)

            # Live ones, made while the replay goes on.
            for n, course in enumerate(live_courses):
                await create(session, (first, second)[n % 2], world.alice.token, course)
            marker = await create(session, first, world.alice.token, "sql-fundamentals")
            await alice.wait_for(
                lambda: any(
                    u["purchase"]["purchase_id"] == marker["purchase_id"]
                    for u in alice.updates(subscription)
                ),
                within=20,
                what="the marker's update",
            )
            seqs = alice.seqs(subscription)
        expected = await seqs_after(engine, last_seen)
        assert len(expected) == 100 + 20 + 1
        assert seqs[:100] == missed
        assert seqs == expected  # every one, in order, none twice
        assert await first.stop() == 0
        assert await second.stop() == 0


async def test_resuming_while_changes_are_being_made_loses_and_repeats_nothing(
    database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    first, second = two_servers(database_url, tmp_path)
    async with started(first), started(second), aiohttp.ClientSession() as session:
        for _ in range(30):
            await create(session, first, world.alice.token, "python-basics")
        since = await latest_seq(engine) - 20
        stop = asyncio.Event()

        async def keep_changing() -> int:
            made = 0
            while not stop.is_set():
                await create(
                    session, (first, second)[made % 2], world.alice.token, "sql-fundamentals"
                )
                made += 1
            return made

        producer = asyncio.create_task(keep_changing())
        try:
            # Subscribe in the middle of the flow, on each process.
            await asyncio.sleep(0.2)
            async with (
                socket_to(session, first, world.staff.token) as on_first,
                socket_to(session, second, world.alice.token) as on_second,
            ):
                subscriptions = [
                    (on_first, await on_first.subscribe(since=since)),
                    (on_second, await on_second.subscribe(since=since)),
                ]
                await asyncio.sleep(0.5)
                stop.set()
                made = await producer
                final = await latest_seq(engine)
                for socket, subscription in subscriptions:
                    await socket.update_with_seq(final, subscription, within=20)
                    assert socket.seqs(subscription) == await seqs_after(engine, since)
        finally:
            stop.set()
            await producer
        assert made > 0
        assert await first.stop() == 0
        assert await second.stop() == 0


# --- (c) the LISTEN connection killed ---------------------------------------------------


async def test_every_event_arrives_in_order_when_the_listen_connections_are_killed(
    database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    courses = await add_courses(engine, "killed", 40)
    first, second = two_servers(database_url, tmp_path)
    async with started(first), started(second), aiohttp.ClientSession() as session:
        since = await latest_seq(engine)
        before = await listeners_back(engine, set(), 2, within=10)  # one per process
        async with (
            socket_to(session, first, world.staff.token) as staff_on_first,
            socket_to(session, second, world.staff.token) as staff_on_second,
            socket_to(session, first, world.alice.token) as alice_on_first,
        ):
            subscribers = [
                (socket, await socket.subscribe(since=since))
                for socket in (staff_on_first, staff_on_second, alice_on_first)
            ]
            killed: set[int] = set()
            for n, course in enumerate(courses):
                made_on, paid_on = (first, second) if n % 2 else (second, first)
                purchase = await create(session, made_on, world.alice.token, course)
                await fulfil(session, paid_on, world, purchase["purchase_id"])
                if n in (10, 25):  # twice, while changes are being made
                    if killed:
                        # The second time once the first ones' replacements listen (how
                        # soon a lost LISTEN is noticed varies; 15 calls may take less).
                        await listeners_back(engine, killed, 2, within=15)
                    ended = await kill_listeners(engine)
                    assert len(ended) >= 2, ended
                    killed |= ended
            assert before <= killed
            await listeners_back(engine, killed, 2, within=15)
            expected = await seqs_after(engine, since)
            assert len(expected) == 80
            for socket, subscription in subscribers:
                await socket.update_with_seq(expected[-1], subscription, within=20)
                assert socket.seqs(subscription) == expected
        assert await first.stop() == 0
        assert await second.stop() == 0


# --- (d) a reader that never reads --------------------------------------------------------


def server_socket_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server's end of the TCP connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            return int(fields[9])
    return None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` still has the socket ``inode`` open."""
    target = f"socket:[{inode}]"
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if fd.readlink().as_posix() == target:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


# Each event of the stalled reader's stream is made large (a failure with a long message,
# in the event and in the purchase), so that fewer of them fill the kernel's buffers.
LONG_ERROR = "Card declined by the issuing bank. " * 28


async def test_a_reader_that_stops_reading_is_closed_and_memory_stays_bounded(
    database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    server = ServerProcess(server_env(database_url, tmp_path), tmp_path / "server.log")
    batch = 100
    # Events at most before giving up on the server dropping the stalled peer: measured,
    # the server gives up on it after about 2,000 of these (the kernel buffers up to 4 MiB).
    most = 10_000
    async with started(server), aiohttp.ClientSession() as session:
        async with socket_to(session, server, world.staff.token) as reader:
            reading = await reader.subscribe()
            stalled = RawPeer(server.port, receive_buffer=4096)
            try:
                head = await stalled.upgrade({"Authorization": f"Bearer {world.staff.token}"})
                assert head.startswith(b"HTTP/1.1 101"), head
                inode = server_socket_inode(server.port, stalled.sock.getsockname()[1])
                assert inode and holds_socket(server.pid, inode)
                await stalled.send_text(
                    '{"jsonrpc": "2.0", "method": "purchase.subscribe", "params": {}, "id": 1}'
                )
                # Warm up the server's allocator, then measure.
                await create(session, server, world.alice.token, "python-basics")
                await reader.updates_at_least(1, reading)
                rss_before = server.rss_kib()
                since = await latest_seq(engine)

                made = 0
                started_at = time.monotonic()
                while holds_socket(server.pid, inode):
                    assert made < most, (
                        f"the server still holds the stalled peer after {made} events"
                    )
                    creates = [
                        {"jsonrpc": "2.0", "method": "purchase.create",
                         "params": {"course": "python-basics"}, "id": n}
                        for n in range(batch)
                    ]  # fmt: skip
                    created = await call(session, server, creates, world.alice.token)
                    failures = [
                        {"jsonrpc": "2.0", "method": "purchase.fulfill",
                         "params": {"purchase_id": answer["result"]["purchase_id"],
                                    "purchase_state": "failed", "error_msg": LONG_ERROR},
                         "id": n}
                        for n, answer in enumerate(created)
                    ]  # fmt: skip
                    failed = await call(session, server, failures, world.alice.token)
                    assert all("result" in answer for answer in failed), failed[:2]
                    made += 2 * batch
                ended_after = time.monotonic() - started_at
                rss_after = server.rss_kib()
                # What the kernel still held for it arrives, then the end of the stream.
                frames, ended = await stalled.read_until_closed(within=30)
            finally:
                stalled.close()
            expected = await seqs_after(engine, since)
            await reader.update_with_seq(expected[-1], reading, within=30)
            got = reader.seqs(reading)
        assert await server.stop() == 0
    print(
        f"\nstalled peer dropped after {made} events ({ended_after:.1f}s); "
        f"server RSS {rss_before // 1024} -> {rss_after // 1024} MiB; "
        f"{len(frames)} frames were still on their way to it"
    )
    assert ended
    close = close_code_of(frames)
    if close is not None:  # the close frame got through: it says why
        assert close[0] == POLICY_VIOLATION and close[1].startswith("too slow"), close
    updates = [frame for opcode, frame in frames if opcode == OPCODE_TEXT]
    assert len(updates) < made  # it was cut off, not sent everything
    assert rss_after - rss_before < RSS_GROWTH_BOUND_KIB, (rss_before, rss_after)
    # The reader that kept reading got every event, in order, once.
    assert got[-len(expected) :] == expected
    assert len(got) == len(expected) + 1


# --- (e) authentication and shutdown ----------------------------------------------------


async def test_a_socket_that_never_authenticates_is_closed_within_the_auth_timeout(
    database_url: str, world: World, tmp_path: Path
) -> None:
    timeout = 1.0
    server = ServerProcess(
        server_env(database_url, tmp_path, ws_auth_timeout=timeout), tmp_path / "server.log"
    )
    async with started(server), aiohttp.ClientSession() as session:
        opened = time.monotonic()
        async with socket_to(session, server) as silent, socket_to(session, server) as talking:
            assert len(await talking.result("course.list")) == 2  # no token needed
            await talking.result("rpc.authenticate", {"token": world.bob.token})
            closed = await silent.wait_closed(within=timeout + 10)
            assert closed.code == POLICY_VIOLATION, closed
            assert closed.reason.startswith("authentication"), closed
            assert timeout - 0.1 <= closed.at - opened <= timeout + SLACK, closed.at - opened
            assert "items" in await talking.result("purchase.list")
        assert await server.stop() == 0


async def test_sigterm_closes_the_open_sockets_going_away_and_exits_cleanly(
    database_url: str, world: World, tmp_path: Path
) -> None:
    server = ServerProcess(server_env(database_url, tmp_path), tmp_path / "server.log")
    async with started(server), aiohttp.ClientSession() as session:
        async with socket_to(session, server, world.alice.token) as alice:
            await alice.subscribe()
            server.terminate()
            closed = await alice.wait_closed(within=30)
            assert closed.code == GOING_AWAY, closed
        assert await server.wait() == 0
