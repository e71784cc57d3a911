"""Receipts claimed by a process killed with SIGKILL go out soon after a restart.

A real ``rpc-server serve`` with the default lease (``RPC_SERVER_MAIL_LEASE``, 15 s,
renewed while a send goes on) claims a burst of receipts and is sending them to an SMTP
server that holds every DATA; it is killed mid-send. The claims die with it: a new
process on the same database sends every receipt within the lease of the kill (not the
300 s the lease once was), each at least once, with the same Message-ID when twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.mail.receipts import message_id_for
from tests.conftest import World
from tests.integration.smtp_server import fulfilled_purchase, more_courses
from tests.reliability.load import (
    ServerProcess,
    database_snapshot,
    eventually_all_sent,
    mail_server,
    server_env,
    started,
)

RECEIPTS = 20
DEFAULT_LEASE = Settings().mail_lease


async def test_receipts_claimed_by_a_killed_process_go_out_within_the_lease(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    assert DEFAULT_LEASE <= 15, "the default lease is short"
    courses = ["python-basics", "sql-fundamentals", *await more_courses(uow_factory, RECEIPTS - 2)]
    with mail_server(delay=30.0) as (smtp, mail):
        env = server_env(database_url, tmp_path, smtp_url=smtp.url, mail_lease=None)
        first = ServerProcess(env, tmp_path / "first.log")
        second = ServerProcess(env, tmp_path / "second.log", port=first.port)
        async with started(first):
            purchase_ids = [
                await fulfilled_purchase(uow_factory, world.alice.actor, course)
                for course in courses
            ]
            deadline = time.monotonic() + 10
            while mail.in_data == 0 or not (await database_snapshot(engine)).claimed():
                assert time.monotonic() < deadline, first.tail()
                await asyncio.sleep(0.05)
            claimed = (await database_snapshot(engine)).claimed()
            first.kill()
            killed_at = time.monotonic()
            assert await first.wait() == -9
        mail.delay = 0.0

        async with started(second):
            snapshot = await eventually_all_sent(engine, within=DEFAULT_LEASE + 15)
            all_sent_after = time.monotonic() - killed_at
            assert await second.stop() == 0

    assert set(snapshot.outbox_statuses()) == {"sent"}, snapshot.outbox_statuses()
    # Claimed by the dead process, each of them waited out no more than the lease.
    assert claimed, "the kill came while receipts were claimed"
    assert all_sent_after < DEFAULT_LEASE + 10, all_sent_after
    received = mail.message_ids()
    expected = {message_id_for(pid, env_mail_from(env)) for pid in purchase_ids}
    assert set(received) == expected, "every receipt reached the mail server"


def env_mail_from(env: dict[str, str]) -> str:
    return env.get("RPC_SERVER_MAIL_FROM", Settings().mail_from)
