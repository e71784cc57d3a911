"""Metrics of real ``rpc-server serve`` processes on PostgreSQL (issue 19).

- ``serve --workers 2``: whichever worker answers ``GET /metrics`` reports the calls of
  both (prometheus-client's multiprocess mode, the values added up over the workers'
  files). Which worker served what is read from those files one worker at a time.
- Two separate ``serve`` processes on one database: each reports only its own calls (a
  Prometheus server sums them), while the database-wide receipt backlog is the same on
  both.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World
from tests.processes import running_server

ROUND = 100  # calls sent at once
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own


def worker_processes(parent: int) -> list[int]:
    """The child processes of ``parent`` (gunicorn's arbiter forks nothing but workers)."""
    return [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]


async def workers_of(parent: int, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(workers := worker_processes(parent)) != count:
        assert time.monotonic() < deadline, workers
        await asyncio.sleep(0.05)
    return workers


async def call(
    session: aiohttp.ClientSession, port: int, method: str, id: int, token: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(
        f"http://127.0.0.1:{port}/rpc",
        json={"jsonrpc": "2.0", "method": method, "id": id},
        headers=headers,
    ) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        assert "result" in answer, answer
        return answer


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, dict[Any, float]]:
    """GET /metrics, parsed: {sample name: {label set: value}}."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.content_type == "text/plain"
    return samples_of(text_string_to_metric_families(text))


def samples_of(families: Any) -> dict[str, dict[Any, float]]:
    samples: dict[str, dict[Any, float]] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def calls_of(samples: dict[str, dict[Any, float]], method: str) -> float:
    """rpc_server_calls_total of ``method``, every outcome."""
    return sum(
        value
        for labels, value in samples.get("rpc_server_calls_total", {}).items()
        if dict(labels)["method"] == method
    )


def worker_samples(directory: Path, pid: int, tmp: Path) -> dict[str, dict[Any, float]]:
    """One worker's own values, read from its files alone (copied to a directory of
    their own, added up by the same collector a scrape uses)."""
    alone = Path(tempfile.mkdtemp(dir=tmp))
    for path in directory.glob(f"*_{pid}.db"):
        shutil.copy(path, alone / path.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
    return samples_of(registry.collect())


def checkouts(samples: dict[str, dict[Any, float]]) -> float:
    """How many connections a process took from its pool (one per scrape, when idle)."""
    return samples.get("rpc_server_db_pool_wait_seconds_count", {}).get((), 0.0)


@pytest.mark.backends("postgresql")
async def test_every_worker_reports_the_calls_of_all_workers(
    database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        # The operator's own directory (rather than the arbiter's private one), so that
        # the test can read which worker counted what.
        MULTIPROCESS_DIR_VARIABLE: str(directory),
        # No deliverer: a scrape is the only thing taking a connection once calls end.
        "RPC_SERVER_MAIL_IN_SERVE": "false",
        # Calls without a token share one address's bucket: no limits here.
        "RPC_SERVER_RATE_LIMIT": "0",
        "RPC_SERVER_ANONYMOUS_RATE_LIMIT": "0",
    }
    with running_server(env, "--workers", "2") as (port, server):
        workers = await workers_of(server.pid, 2)
        # A fresh connection per call: the kernel hands each to either worker, though
        # not evenly (one may take a whole round): rounds until both have served some.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            sent = 0
            deadline = time.monotonic() + 30
            while True:
                answers = await asyncio.gather(
                    *(call(session, port, "course.list", sent + i) for i in range(ROUND))
                )
                assert sorted(a["id"] for a in answers) == list(range(sent, sent + ROUND))
                sent += ROUND
                each = {pid: worker_samples(directory, pid, tmp_path) for pid in workers}
                per_worker = {pid: calls_of(one, "course.list") for pid, one in each.items()}
                assert sum(per_worker.values()) == sent, per_worker
                if all(count > 0 for count in per_worker.values()):
                    break
                assert time.monotonic() < deadline, per_worker
            # Scrape until both workers have answered some scrapes (each scrape takes one
            # connection from the answering worker's pool, for the receipt backlog):
            # every scrape shows every worker's calls.
            taken = {pid: checkouts(samples) for pid, samples in each.items()}
            answered: dict[int, float] = {}
            deadline = time.monotonic() + 30
            while not (answered and all(answered.values())):
                assert time.monotonic() < deadline, answered
                samples = await scrape(session, port)
                assert samples["rpc_server_calls_total"] == {
                    (("method", "course.list"), ("outcome", "ok")): sent
                }
                assert samples["rpc_server_requests_total"][(("transport", "http"),)] == sent
                # Sockets and connections are summed over live workers: none open now.
                assert samples["rpc_server_websocket_connections"] == {(): 0}
                assert samples["rpc_server_db_connections_in_use"] == {(): 0}
                assert samples["rpc_server_receipt_backlog_up"] == {(): 1}
                answered = {
                    pid: checkouts(worker_samples(directory, pid, tmp_path)) - taken[pid]
                    for pid in workers
                }


@pytest.mark.backends("postgresql")
async def test_separate_processes_count_their_own_calls_and_share_the_backlog(
    database_url: str, world: World, uow_factory: SqlUnitOfWorkFactory, tmp_path: Path
) -> None:
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        # No deliverer: the receipt stays pending for both to see.
        "RPC_SERVER_MAIL_IN_SERVE": "false",
    }
    with running_server(env) as (first, _), running_server(env) as (second, _):
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                await call(session, first, "course.list", i)
            for i in range(5):
                await call(session, second, "course.list", i)
            await call(session, second, "purchase.list", 99, world.alice.token)
            assert calls_of(await scrape(session, first), "course.list") == 3
            assert calls_of(await scrape(session, first), "purchase.list") == 0
            assert calls_of(await scrape(session, second), "course.list") == 5
            assert calls_of(await scrape(session, second), "purchase.list") == 1

            # A receipt queued by the first process is pending for both.
            fulfil = {
                "jsonrpc": "2.0",
                "method": "purchase.fulfill",
                "params": {"purchase_id": purchase.purchase_id, "purchase_state": "fulfilled"},
                "id": 1,
            }
            async with session.post(
                f"http://127.0.0.1:{first}/rpc",
                json=fulfil,
                headers={"Authorization": f"Bearer {world.payments.token}"},
            ) as response:
                assert "result" in await response.json()
            for port in (first, second):
                samples = await scrape(session, port)
                assert samples["rpc_server_receipts"][(("status", "pending"),)] == 1
                assert samples["rpc_server_receipts"][(("status", "dead"),)] == 0
                assert samples["rpc_server_receipt_oldest_pending_age_seconds"][()] >= 0
            transitions = {
                port: (await scrape(session, port)).get("rpc_server_purchase_transitions_total", {})
                for port in (first, second)
            }
            # The state change is the first process's alone.
            assert transitions[first] == {(("from_state", "pending"), ("to_state", "fulfilled")): 1}
            assert transitions[second] == {}
            # One process: its own process_* series beside the server's.
            assert "process_cpu_seconds_total" in await scrape(session, first)
