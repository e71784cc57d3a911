"""Several deliverers over one outbox: every receipt is sent exactly once.

On PostgreSQL the deliverers claim with FOR UPDATE SKIP LOCKED; on SQLite, claims are
serialized by BEGIN IMMEDIATE. Each deliverer here has its own engine (its own pool),
as separate processes would; the last test uses separate processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpc_server.config import Settings
from rpc_server.db.engines import open_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.mail.deliverer import build_deliverer
from tests.conftest import World
from tests.integration.smtp_server import SmtpServer, fulfilled_purchase, more_courses
from tests.processes import RPC_SERVER

RECEIPTS = 40


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


async def make_receipts(uow_factory: SqlUnitOfWorkFactory, world: World) -> set[str]:
    """Alice and bob each buy and pay for half as many courses as there are receipts."""
    courses = await more_courses(uow_factory, RECEIPTS // 2)
    return {
        await fulfilled_purchase(uow_factory, buyer.actor, course)
        for course in courses
        for buyer in (world.alice, world.bob)
    }


def assert_each_sent_once(smtp: SmtpServer, purchase_ids: set[str]) -> None:
    message_ids = Counter(str(r.message["Message-ID"]) for r in smtp.received)
    assert all(count == 1 for count in message_ids.values()), message_ids.most_common(3)
    assert {m.split("@")[0].removeprefix("<receipt-") for m in message_ids} == purchase_ids


async def test_two_deliverers_racing_send_each_receipt_once(
    settings: Settings,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    smtp: SmtpServer,
) -> None:
    purchase_ids = await make_receipts(uow_factory, world)
    smtp_settings = dataclasses.replace(settings, smtp_url=smtp.url)
    engines = [open_engine(settings.database_url) for _ in range(2)]
    try:
        deliverers = [
            build_deliverer(smtp_settings, SqlUnitOfWorkFactory(engine)) for engine in engines
        ]
        for deliverer in deliverers:
            # Small claims, never growing, so the two interleave.
            deliverer.batch_size = deliverer.max_claim = 3
        handled = await asyncio.gather(*(d.deliver_all() for d in deliverers))
    finally:
        for engine in engines:
            await engine.close()
    assert sum(handled) == RECEIPTS
    assert all(count > 0 for count in handled), handled  # both took part
    assert_each_sent_once(smtp, purchase_ids)


@pytest.mark.backends("postgresql")
async def test_deliverer_processes_racing_send_each_receipt_once(
    database_url: str,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    purchase_ids = await make_receipts(uow_factory, world)
    env = {
        **os.environ,
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_SMTP_URL": smtp.url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "unused"),
    }
    processes = [
        await asyncio.create_subprocess_exec(
            RPC_SERVER,
            "send-mail",
            "--once",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [(await p.communicate())[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    handled = [int(o.strip().splitlines()[-1].split()[0]) for o in outputs]
    assert sum(handled) == RECEIPTS, outputs
    assert_each_sent_once(smtp, purchase_ids)
