"""Several server processes on one database: still exactly once; and ``serve --workers``
(gunicorn's arbiter and its workers) sharing a port, restarting a worker that dies, and
stopping cleanly even while its workers are still starting."""

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

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
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


def worker_processes(parent: int) -> list[int]:
    """The child processes of ``parent`` (gunicorn's arbiter forks nothing but workers)."""
    return [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]


async def workers_of(parent: int, count: int, *, without: int) -> list[int]:
    """The workers of ``parent`` once there are ``count`` and ``without`` is not one."""
    deadline = time.monotonic() + 20
    while len(workers := worker_processes(parent)) != count or without in workers:
        assert time.monotonic() < deadline, workers
        await asyncio.sleep(0.05)
    return workers


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(sql))).scalar_one())


@pytest.mark.backends("postgresql")
async def test_fifty_fulfills_over_two_processes_give_one_registration_and_receipt(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
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
        # Healthy means one worker answers; gunicorn forks the second up to 0.1 s later.
        started = await workers_of(server.pid, 2, without=-1)
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
    assert sorted(workers) == sorted(started)  # the same two, none died serving
    assert sorted(answer["id"] for answer in answers) == list(range(20))  # type: ignore[index]


# The workers' drain bound in the tests below; gunicorn kills a worker 5 s after it.
SHUTDOWN_TIMEOUT = 10


def test_sigterm_while_workers_are_still_starting_stops_them_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    # gunicorn logs "Booting worker" in the worker right after the fork, before the
    # worker has its own signal handlers, and the app (its pool, its deliverer) starts
    # after that. A SIGTERM passed on then must wait (blocked) for the worker's handler
    # and drain it, not be lost: a lost one leaves the worker serving until gunicorn
    # kills it at the graceful timeout ("was sent SIGKILL").
    env = {
        **os.environ,
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
    }
    command = [RPC_SERVER, "serve", "--port", str(free_port()), "--workers", "2"]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while _read(log).count("Booting worker with pid") < 2:
            assert server.poll() is None and time.monotonic() < deadline, _read(log)
            time.sleep(0.001)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        server.wait(timeout=60)
        stopped_in = time.monotonic() - signalled
        output = _read(log)
    assert "was sent" not in output, output  # "Worker (pid:N) was sent SIGKILL!"
    assert "exited with code" not in output, output
    assert output.count("Worker exiting") == 2, output
    assert server.returncode == 0, output
    assert stopped_in < SHUTDOWN_TIMEOUT, output  # not the graceful timeout's SIGKILL


async def test_a_worker_killed_is_replaced_and_the_service_answers_again(
    database_url: str, world: World, tmp_path: Path
) -> None:
    env = {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail")}
    output: list[str] = []
    with running_server(env, "--workers", "2", output=output) as (port, server):
        # /healthz answers once one worker serves; gunicorn forks the next a moment later.
        before = await workers_of(server.pid, 2, without=-1)
        os.kill(before[0], signal.SIGKILL)
        after = await workers_of(server.pid, 2, without=before[0])
        replacement = (set(after) - set(before)).pop()
        # The survivor never stopped accepting: no call fails while the replacement
        # starts (it accepts from the same socket once it serves).
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = await asyncio.gather(
                *(post(session, port, world.alice.token, COURSE_LIST) for _ in range(40))
            )
    assert all("result" in answer for answer in answers), answers[:3]  # type: ignore[operator]
    log = output[0]
    assert f"Worker (pid:{before[0]}) was sent SIGKILL" in log, log
    assert f"worker {replacement} serving" in log, log
    assert f"Worker exiting (pid: {replacement})" in log, log  # stopped cleanly at the end


COURSE_LIST = {"jsonrpc": "2.0", "method": "course.list", "id": 1}


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read())


async def test_workers_make_request_ids_of_their_own(
    database_url: str, world: World, tmp_path: Path
) -> None:
    # gunicorn forks its workers from one process: a per-process random prefix chosen at
    # import would be every worker's, and their counters would give the same ids.
    env = {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail")}
    with running_server(env, "--workers", "2") as (port, server):
        await workers_of(server.pid, 2, without=-1)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def request_id() -> str:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200
                    return response.headers["X-Request-ID"]

            ids = await asyncio.gather(*(request_id() for _ in range(200)))
    assert len(set(ids)) == len(ids), sorted(ids)[:10]
