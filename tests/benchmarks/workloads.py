"""The workloads: what each sends, which baselines it is compared with, and its target.

A workload has one or more variants (``list-first`` has ``10k`` and ``1M``: the same
page for a user with 10,000 purchases and one with a million); every round measures
each variant on the project, then on its baseline (the hand-written server, or the
floor for the trivial ones: the ratio to it is the headline), then on its extra
baselines (same-work, and same-work coalescing batch reads for get-batch: secondary
ratios). Plans are built per measurement, because fulfilling needs purchases no one has
fulfilled yet (and buying, courses no one bought yet: a user registered for a course
cannot buy it again). Fulfilling is the payment backend's call (a payments-scope
token: no proof of payment to verify). ``receipts`` is measured apart (receipts.py):
the project alone, with its receipt deliverer on each mail backend and off.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.benchmarks import loadgen
from tests.benchmarks.seed import Dataset, fresh_courses, fresh_pending, take_pending

BATCH = 50
MIXED_PATTERN = "LGCLGLFLGCLGLFLGCLFG"  # 8 list, 6 get, 3 create, 3 fulfill in 20 calls


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # The denominator of the headline ratio: "floor" or "hand-written"; "" for receipts.
    baseline: str
    calls_per_request: int = 1
    variants: tuple[str, ...] = ("",)
    uses_database: bool = True
    # Fresh purchases are created for every measurement (fulfill, mixed).
    consumes: bool = False
    # Baselines measured too, for secondary ratios: "same-work", "same-work-coalesced".
    extras: tuple[str, ...] = ()

    @property
    def baselines(self) -> tuple[str, ...]:
        return (self.baseline, *self.extras) if self.baseline else ()


SAME_WORK = ("same-work",)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "trivial",
            "rpc.discover, one call per request, no token (no database work)",
            "floor",
            uses_database=False,
        ),
        Workload(
            "trivial-batch",
            f"rpc.discover, a batch of {BATCH} per request, no token",
            "floor",
            calls_per_request=BATCH,
            uses_database=False,
        ),
        Workload(
            "get",
            "purchase.get of a random purchase of the caller (10,000 of them)",
            "hand-written",
            extras=SAME_WORK,
        ),
        Workload(
            "get-batch",
            f"purchase.get, a batch of {BATCH} random purchases of the caller per request "
            "(repeats possible)",
            "hand-written",
            calls_per_request=BATCH,
            extras=("same-work", "same-work-coalesced"),
        ),
        Workload(
            "fulfill",
            "purchase.fulfill (fulfilled) of a pending purchase, each once, by the payment "
            "backend (payments scope)",
            "hand-written",
            consumes=True,
            extras=SAME_WORK,
        ),
        Workload(
            "list-first",
            "purchase.list first page (limit 20) of a user with 10k / 1M purchases",
            "hand-written",
            variants=("10k", "1M"),
            extras=SAME_WORK,
        ),
        Workload(
            "list-deep",
            "purchase.list page (limit 20) at a cursor in the middle half of the same histories",
            "hand-written",
            variants=("10k", "1M"),
            extras=SAME_WORK,
        ),
        Workload(
            "mixed",
            "frontend-like: 40% list, 30% get, 15% create, 15% fulfill (by the payment "
            "backend) of what was just created, 7 users, single calls",
            "hand-written",
            consumes=True,
            extras=SAME_WORK,
        ),
        Workload(
            "receipts",
            "the project alone: purchase.fulfill at saturation with its receipt deliverer "
            "on (file mailer, SMTP to a local sink) and off; receipts/s, backlog, drain",
            "",
            variants=("file", "smtp", "off"),
            consumes=True,
        ),
    )
}


def rpc(method: str, params: Any, id_: Any) -> bytes:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        call["params"] = params
    call["id"] = id_
    return orjson.dumps(call)


def cursor(row_id: int) -> str:
    """The project's opaque page cursor for "continue before row ``row_id``"."""
    return base64.urlsafe_b64encode(f"p{row_id}".encode()).decode().rstrip("=")


@dataclass
class PlanContext:
    dataset: Dataset | None
    directory: Path
    rng: random.Random
    # The pending purchases of the last fulfill plan, in plan order (unused ones go back).
    last_pending: list[str] = field(default_factory=list)


async def build_plan(
    context: PlanContext,
    workload: Workload,
    variant: str,
    *,
    label: str,
    fresh_count: int = 0,
) -> tuple[Path, Path]:
    """Write the plan of one measurement; return (wrk script, plan file).

    ``fresh_count``: for consuming workloads, how many fresh pending purchases to create.
    """
    rng = context.rng
    path = context.directory / f"{label}.plan"
    name = workload.name
    if name in ("trivial", "trivial-batch"):
        if name == "trivial":
            body = rpc("rpc.discover", None, 1)
        else:
            body = b"[" + b",".join(rpc("rpc.discover", None, i) for i in range(BATCH)) + b"]"
        return loadgen.REPLAY_SCRIPT, loadgen.write_replay_plan(path, [(None, body)])
    dataset = context.dataset
    assert dataset is not None
    if name == "get":
        auth = dataset.get_user.authorization
        requests = [
            (auth, rpc("purchase.get", {"purchase_id": rng.choice(dataset.get_ids)}, i))
            for i in range(1000)
        ]
        return loadgen.REPLAY_SCRIPT, loadgen.write_replay_plan(path, requests)
    if name == "get-batch":
        auth = dataset.get_user.authorization
        batches = []
        for _ in range(200):
            ids = rng.choices(dataset.get_ids, k=BATCH)
            body = (
                b"["
                + b",".join(
                    rpc("purchase.get", {"purchase_id": pid}, i) for i, pid in enumerate(ids)
                )
                + b"]"
            )
            batches.append((auth, body))
        return loadgen.REPLAY_SCRIPT, loadgen.write_replay_plan(path, batches)
    if name in ("list-first", "list-deep"):
        user = dataset.list_users["small" if variant == "10k" else "big"]
        if name == "list-first":
            requests = [(user.authorization, rpc("purchase.list", {"limit": 20}, 1))]
        else:
            cursors = dataset.deep_cursors["small" if variant == "10k" else "big"]
            requests = [
                (user.authorization, rpc("purchase.list", {"limit": 20, "cursor": cursor(c)}, i))
                for i, c in enumerate(cursors)
            ]
        return loadgen.REPLAY_SCRIPT, loadgen.write_replay_plan(path, requests)
    if name in ("fulfill", "receipts"):
        ids = await take_pending(dataset, fresh_count)
        context.last_pending = ids
        requests = [
            (
                dataset.payments_user.authorization,
                rpc("purchase.fulfill", {"purchase_id": pid, "purchase_state": "fulfilled"}, i),
            )
            for i, pid in enumerate(ids)
        ]
        return loadgen.REPLAY_SCRIPT, loadgen.write_replay_plan(path, requests, consume=True)
    if name == "mixed":
        per_user = max(50, fresh_count // len(dataset.mixed_users))
        users = []
        for user in dataset.mixed_users:
            fresh = await fresh_pending(dataset, user, per_user)
            users.append((user.authorization, dataset.mixed_ids[user.user_id], fresh))
        # A new course per create: 3 creates per 20 calls, three times the share of 1 in
        # 20 that fresh_count was computed for.
        return loadgen.MIXED_SCRIPT, loadgen.write_mixed_plan(
            path,
            pattern=MIXED_PATTERN,
            tag=f"{label}-{rng.randrange(10**9)}",
            courses=await fresh_courses(dataset, 3 * fresh_count + 100),
            payments=dataset.payments_user.authorization,
            users=users,
        )
    raise ValueError(f"unknown workload {name}")


def first_request(plan: Path) -> tuple[str | None, bytes]:
    """The first request of a replay plan (for checking both servers answer alike)."""
    with plan.open("rb") as lines:
        next(lines)
        authorization, _, body = next(lines).rstrip(b"\n").partition(b"\t")
    return (None if authorization == b"-" else authorization.decode()), body


def sample_requests(plan: Path, count: int) -> Sequence[tuple[str | None, bytes]]:
    out = []
    with plan.open("rb") as lines:
        next(lines)
        for line in lines:
            authorization, _, body = line.rstrip(b"\n").partition(b"\t")
            out.append((None if authorization == b"-" else authorization.decode(), body))
            if len(out) == count:
                break
    return out
