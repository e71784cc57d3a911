"""Database round trips per call: the project against the same-work baseline.

Both servers run instrumented (``instrumentation --count-to``) on the run's database;
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
    paths = {role: workdir / f"{role}-counts.json" for role in ("project", "same-work")}
    project = servers.project_server(
        url,
        workdir,
        cpus,
        project_env,
        name="project-count",
        instrument=["--count-to", str(paths["project"]), "--count-port", port],
    )
    baseline = servers.same_work_server(
        url,
        workdir,
        cpus,
        pool_size,
        name="same-work-count",
        instrument=["--count-to", str(paths["same-work"]), "--count-port", port],
    )
    results: list[dict[str, Any]] = []
    try:
        project.start()
        baseline.start()
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
            for role, server in (("project", project), ("baseline", baseline)):
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
                await _dump(server, paths["project" if role == "project" else "same-work"])
                for authorization, body in requests[WARMUP_CALLS:]:
                    answer = post(server.url, authorization, body)
                    answers = answer if isinstance(answer, list) else [answer]
                    if any("error" in a for a in answers):
                        raise RuntimeError(f"{role} answered an error to {name}: {answer}")
                counts = await _dump(server, paths["project" if role == "project" else "same-work"])
                entry[role] = {k: v / (calls * per_request) for k, v in counts.items()}
            results.append(entry)
    finally:
        project.stop()
        baseline.stop()
    return results
