"""Several server processes on one PostgreSQL database: still exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.domain import services
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from tests.conftest import World
from tests.integration.paying import serialized
from tests.payments import proof_for
from tests.processes import RPC_SERVER, free_port, running_server


async def post(session: aiohttp.ClientSession, port: int, token: str, payload: object) -> object:
    async with session.post(
        f"http://127.0.0.1:{port}/rpc", json=payload, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200
        return await response.json()


def worker_processes(parent: int) -> list[str]:
    """Child processes of ``parent`` that are server workers (not multiprocessing helpers)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        pid for pid in children
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]  # fmt: skip


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(sql))).scalar_one())


@pytest.mark.backends("postgresql")
async def test_fifty_fulfills_over_two_processes_give_one_registration_and_receipt(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlAlchemyUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    env = {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail")}
    # One payment, its fulfil sent 50 times by the buyer (the servers verify the proof
    # with the test key: tests.processes.running_server).
    request = {
        "jsonrpc": "2.0",
        "method": "purchase.fulfill",
        "params": {
            "purchase_id": purchase.purchase_id,
            "purchase_state": "fulfilled",
            "payment_proof": proof_for(serialized(purchase)),
        },
        "id": 1,
    }
    with running_server(env) as (first, _), running_server(env) as (second, _):
        # A fresh connection per call, so the calls really run side by side.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = await asyncio.gather(
                *(
                    post(session, (first, second)[i % 2], world.alice.token, request)
                    for i in range(50)
                )
            )
        # Both deliverers had their chance at the receipt before the servers stop.
        for _ in range(50):
            if await count(engine, "SELECT count(*) FROM receipt_outbox WHERE status = 'sent'"):
                break
            await asyncio.sleep(0.1)
    assert all("result" in answer for answer in answers), answers[:3]
    assert len({str(answer) for answer in answers}) == 1
    assert await count(engine, "SELECT count(*) FROM course_registrations") == 1
    assert await count(engine, "SELECT count(*) FROM receipt_outbox") == 1
    assert await count(engine, "SELECT count(*) FROM receipt_outbox WHERE status = 'sent'") == 1
    fulfilments = "SELECT count(*) FROM purchase_events WHERE to_state = 'fulfilled'"
    assert await count(engine, fulfilments) == 1
    assert len(list((tmp_path / "mail").glob("*.eml"))) == 1


async def test_workers_share_one_port_and_stop_cleanly(
    database_url: str, world: World, tmp_path: Path
) -> None:
    env = {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail")}
    with running_server(env, "--workers", "2") as (port, server):
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = await asyncio.gather(
                *(
                    post(
                        session,
                        port,
                        world.alice.token,
                        {"jsonrpc": "2.0", "method": "course.list", "id": i},
                    )
                    for i in range(20)
                )
            )
        workers = worker_processes(server.pid)
    assert len(workers) == 2
    assert sorted(answer["id"] for answer in answers) == list(range(20))  # type: ignore[index]


def test_sigterm_while_workers_are_still_starting_stops_them_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    # Workers spend about a second importing before they can handle a signal; one sent
    # then must wait (blocked) until they can, not kill them. The first worker of a
    # supervisor is the one at risk: starting it also starts multiprocessing's resource
    # tracker, which unblocks SIGTERM.
    env = {
        **os.environ,
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
    }
    command = [RPC_SERVER, "serve", "--port", str(free_port()), "--workers", "2"]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while _read(log).count("started") < 2:  # "worker N started", twice
            assert server.poll() is None and time.monotonic() < deadline, _read(log)
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        output = _read(log)
    assert "exited" not in output, output  # "worker N exited (-15) while stopping"
    assert server.returncode == 0, output


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read())
