"""Database round trips per call: the project against the hand-written and same-work
baselines.

The servers run instrumented (``instrumentation --count-to``) on the run's database;
each call kind is sent sequentially (warm-up first, so caches are filled and pools
opened), counters are reset by SIGUSR1, the calls are sent again, and the next SIGUSR1
dumps the counts, divided here by the number of JSON-RPC calls.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from tests.benchmarks import servers
from tests.benchmarks.seed import Dataset, fresh_courses, fresh_pending
from tests.benchmarks.workloads import BATCH, rpc

WARMUP_CALLS = 20


def post(url: str, authorization: str | None, body: bytes) -> Any:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


async def _dump(server: servers.ServerProcess, path: Path) -> dict[str, int]:
    """Have ``server`` write its counts (and reset them); return them."""
    servers.remove(path)
    server.signal(signal.SIGUSR1)
    await servers.wait_for_file(path)
    counts: dict[str, int] = servers.read_json(path)
    servers.remove(path)
    return counts


async def count(
    dataset: Dataset,
    workdir: Path,
    cpus: set[int] | None,
    pool_size: int,
    project_env: dict[str, str],
    calls: int,
) -> list[dict[str, Any]]:
    url = dataset.url
    port = str(make_url(url).port or 5432)
    roles = ("project", "hand-written", "same-work")
    paths = {role: workdir / f"{role}-counts.json" for role in roles}

    # The receipt deliverer's own statements (its polls, its sends) are no call's.
    project_env = {**project_env, "RPC_SERVER_MAIL_IN_SERVE": "false"}

    def instrument(role: str) -> list[str]:
        return ["--count-to", str(paths[role]), "--count-port", port]

    running = {
        "project": servers.project_server(
            url, workdir, cpus, project_env, name="project-count", instrument=instrument("project")
        ),
        "hand-written": servers.handwritten_server(
            url, workdir, cpus, pool_size, name="hand-written-count",
            instrument=instrument("hand-written"),
        ),
        "same-work": servers.same_work_server(
            url, workdir, cpus, pool_size, name="same-work-count",
            instrument=instrument("same-work"),
        ),
    }  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        for server in running.values():
            server.start()
        get_user, list_user = dataset.get_user, dataset.list_users["small"]
        fulfill_user, buyer = dataset.fulfill_user, dataset.mixed_users[0]
        # The payment backend fulfils; the buyer buys a course it has not bought (the
        # creates are never fulfilled, so one new course serves them all).
        payments = dataset.payments_user
        [new_course] = await fresh_courses(dataset, 1)
        for name, per_request in (
            ("purchase.get", 1),
            (f"purchase.get, batch of {BATCH} (per call)", BATCH),
            ("purchase.fulfill (fresh purchase)", 1),
            ("purchase.list first page", 1),
            ("purchase.create (with idempotency key)", 1),
        ):
            entry: dict[str, Any] = {"call": name, "engine": dataset.engine}
            for role, server in running.items():
                total = WARMUP_CALLS + calls
                if name.startswith("purchase.fulfill"):
                    ids = await fresh_pending(dataset, fulfill_user, total)
                    requests = [
                        (
                            payments.authorization,
                            rpc(
                                "purchase.fulfill",
                                {"purchase_id": pid, "purchase_state": "fulfilled"},
                                i,
                            ),
                        )
                        for i, pid in enumerate(ids)
                    ]
                elif name.startswith("purchase.list"):
                    requests = [(list_user.authorization, rpc("purchase.list", {"limit": 20}, 1))]
                    requests *= total
                elif name.startswith("purchase.create"):
                    requests = [
                        (
                            buyer.authorization,
                            rpc(
                                "purchase.create",
                                {"course": new_course, "idempotency_key": f"count-{role}-{i}"},
                                i,
                            ),
                        )
                        for i in range(total)
                    ]
                elif per_request == 1:
                    requests = [
                        (
                            get_user.authorization,
                            rpc("purchase.get", {"purchase_id": dataset.get_ids[i]}, i),
                        )
                        for i in range(total)
                    ]
                else:
                    requests = [
                        (
                            get_user.authorization,
                            b"["
                            + b",".join(
                                rpc("purchase.get", {"purchase_id": pid}, j)
                                for j, pid in enumerate(dataset.get_ids[i : i + BATCH])
                            )
                            + b"]",
                        )
                        for i in range(total)
                    ]
                for authorization, body in requests[:WARMUP_CALLS]:
                    post(server.url, authorization, body)
                await _dump(server, paths[role])
                for authorization, body in requests[WARMUP_CALLS:]:
                    answer = post(server.url, authorization, body)
                    answers = answer if isinstance(answer, list) else [answer]
                    if any("error" in a for a in answers):
                        raise RuntimeError(f"{role} answered an error to {name}: {answer}")
                counts = await _dump(server, paths[role])
                entry[role] = {k: v / (calls * per_request) for k, v in counts.items()}
            results.append(entry)
    finally:
        for server in running.values():
            server.stop()
    return results
