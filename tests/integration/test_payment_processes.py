"""One payment, delivered many times at once to two server processes on one PostgreSQL
database (issue 14): the webhook and the proof race, exactly one of them applies.

Two real ``rpc-server serve`` processes share the database and each runs its own
receipt deliverer against a real SMTP server; 50 deliveries of one signed event to
``POST /webhooks/payments`` and 50 ``purchase.fulfill`` calls carrying the same event as
``payment_proof`` are sent at once, alternating between the processes, each on its own
connection. Every answer is a success, and the purchase has one registration, one
receipt (one message received) and one ``fulfilled`` event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World
from tests.integration.smtp_server import SmtpServer, assert_is_receipt, eventually
from tests.payments import TEST_PAYMENT_KEY, proof_for, webhook_request
from tests.processes import running_server

CALLS_PER_WAY = 50


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(sql))).scalar_one())


async def by_webhook(
    session: aiohttp.ClientSession, port: int, proof: dict[str, Any]
) -> tuple[str, int, Any]:
    headers, body = webhook_request(proof)
    async with session.post(
        f"http://127.0.0.1:{port}/webhooks/payments", data=body, headers=headers
    ) as response:
        return "webhook", response.status, await response.json()


async def by_proof(
    session: aiohttp.ClientSession, port: int, token: str, params: dict[str, Any], number: int
) -> tuple[str, int, Any]:
    request = {"jsonrpc": "2.0", "method": "purchase.fulfill", "params": params, "id": number}
    async with session.post(
        f"http://127.0.0.1:{port}/rpc", json=request, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return "proof", response.status, await response.json()


@pytest.mark.slow
@pytest.mark.backends("postgresql")
async def test_fifty_webhooks_and_fifty_proofs_of_one_payment_over_two_processes_apply_once(
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    created = await services.create_purchase(uow_factory, world.alice.actor, course="python-basics")
    purchase = {"purchase_id": created.purchase_id, "amount": "49.00", "currency": "USD"}
    proof = proof_for(purchase, payment_ref="pi_two_processes")
    params = {
        "purchase_id": created.purchase_id,
        "purchase_state": "fulfilled",
        "payment_proof": proof,
    }
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY,
        "RPC_SERVER_RATE_LIMIT": "0",
        "RPC_SERVER_SMTP_URL": smtp.url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_MAIL_POLL_INTERVAL": "0.2",
        "RPC_SERVER_MAIL_RETRY_BASE": "0.1",
        "RPC_SERVER_MAIL_RETRY_CAP": "0.5",
    }
    with running_server(env) as (first, _), running_server(env) as (second, _):
        ports = (first, second)
        # A fresh connection per call, so that the calls really run side by side.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            calls = []
            for i in range(CALLS_PER_WAY):
                calls.append(by_webhook(session, ports[i % 2], proof))
                calls.append(by_proof(session, ports[(i + 1) % 2], world.alice.token, params, i))
            answers = await asyncio.gather(*calls)
        # Both deliverers had their chance at the receipt before the servers stop.
        await eventually(
            lambda: count(engine, "SELECT count(*) FROM receipt_outbox WHERE status = 'sent'"),
            within=15,
            what="the receipt sent",
        )
        await asyncio.sleep(1.0)  # time for a second (wrong) delivery to show

    hooks = [(status, body) for way, status, body in answers if way == "webhook"]
    proofs = [(status, body) for way, status, body in answers if way == "proof"]
    assert len(hooks) == len(proofs) == CALLS_PER_WAY
    for status, body in hooks:
        assert status == 200, body
        assert body["status"] in {"applied", "repeated", "duplicate"}, body
        assert (body["purchase_id"], body["state"]) == (created.purchase_id, "fulfilled"), body
    assert sum(body["status"] == "applied" for _, body in hooks) <= 1
    for status, body in proofs:
        assert status == 200, body
        assert "result" in body, body
        assert body["result"]["purchase"]["state"] == "fulfilled", body
    # Every fulfill answer is the same (the winner's, repeated).
    assert len({json.dumps(body["result"], sort_keys=True) for _, body in proofs}) == 1

    assert await count(engine, "SELECT count(*) FROM course_registrations") == 1
    assert await count(engine, "SELECT count(*) FROM receipt_outbox") == 1
    assert await count(engine, "SELECT count(*) FROM receipt_outbox WHERE status = 'sent'") == 1
    assert await count(engine, "SELECT count(*) FROM purchase_events") == 2
    assert (
        await count(engine, "SELECT count(*) FROM purchase_events WHERE to_state = 'fulfilled'")
        == 1
    )
    assert (
        await count(
            engine,
            "SELECT count(*) FROM purchases WHERE state = 'fulfilled' "
            "AND payment_ref = 'pi_two_processes'",
        )
        == 1
    )
    assert len(smtp.received) == 1
    assert smtp.received[0].rcpt_tos == ("alice@example.com",)
    assert_is_receipt(
        smtp.received[0].message,
        settings=Settings(),  # the servers' mail_from is the default
        purchase_id=created.purchase_id,
        recipient="alice@example.com",
        title="Python Basics",
        amount="49.00",
    )
