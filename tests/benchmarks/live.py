"""The live-updates benchmark (issue 18): notifications over WebSocket across two processes.

    .venv/bin/python -m tests.benchmarks.live [--subscribers 1000] [--rate 200]
        [--duration 30] [--http-rounds 5] [--output PATH] [--json PATH]

A fresh PostgreSQL database (created here, dropped at the end) serves two ``rpc-server
serve`` processes with the product's defaults (rate limits raised out of the load's
reach, as in the other benchmarks: ``servers.project_env``). This process is the load
generator and measures:

1. **Memory**: each server's RSS before any subscriber connects, then with the
   subscribers connected (split evenly across the two processes): MiB per 1,000.
2. **Latency of live updates**: ``--subscribers`` WebSockets (aiohttp client), each a
   *buyer* with its own token, authenticated on the upgrade and subscribed to its own
   purchases (``purchase.subscribe {}``: no purchase id, no ``since``). The payment backend
   (a payments-scope token) fulfils the buyers' pending purchases with ``purchase.fulfill``
   over HTTP at ``--rate`` per second (call k is due at k / rate, whatever the answers
   do; at most ``--in-flight`` calls open per process, a payment backend's pool),
   alternating between the two processes, for ``--warmup`` + ``--duration`` seconds,
   after a reference phase at ``--probe-rate`` (10/s, far from saturation); the buyers
   are visited in a shuffled order, so about half the notifications come from the other
   process (through PostgreSQL's NOTIFY). The commit happens inside
   the fulfil call, so the time from commit to notification lies between two measured
   times, both reported: the notification's arrival minus the fulfil answer's arrival (a
   lower bound: it can be negative) and minus the fulfil request's send time (an upper
   bound).
3. **Exactly once**: every event of a subscribed buyer's purchases committed during the
   run (read back from ``purchase_events``) must reach that buyer's socket once:
   missing, duplicated, unexpected (not in the socket's scope) and out-of-order
   notifications are counted, as are sockets the server closed.
4. **HTTP does not regress**: ``purchase.get`` (single) and ``purchase.fulfill`` at
   saturation on process A (wrk when installed, else an aiohttp loop), with no subscriber
   connected and with the subscribers connected and idle (the fulfils are of a buyer no one
   watches: each event still goes through both processes' live machinery), alternating
   which comes first, round after round; medians and per-round ratios.

Nothing is pinned: the two servers, PostgreSQL and this load generator share the machine's
two cores, so the latencies include waiting for a CPU; the load generator's own event loop
lag is reported beside them. See the "live updates" section of README.md in this folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy.engine import make_url

from rpc_server.db.engines import open_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import Scope
from tests.benchmarks import loadgen, seed, servers
from tests.benchmarks.receipts import wait_outbox_drained
from tests.benchmarks.workloads import rpc

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "LIVE_RESULTS.md"
PARTIAL_OUTPUT = Path(tempfile.gettempdir()) / "rpc-bench-LIVE_RESULTS.md"
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SUBSCRIBE = orjson.dumps(
    {"jsonrpc": "2.0", "method": "purchase.subscribe", "params": {}, "id": 1}
).decode()
GET_USER_PURCHASES = 10_000
# Options whose values change what is measured: a run with any of them changed writes
# PARTIAL_OUTPUT unless --output says otherwise.
MEASURING = (
    "subscribers",
    "rate",
    "duration",
    "warmup",
    "in_flight",
    "probe_rate",
    "probe_duration",
    "http_rounds",
    "http_duration",
)
# A first guess of process A's fulfil throughput (how many pending purchases a plan needs).
FIRST_GUESS_RPS = 400.0
LAG_INTERVAL = 0.005
TIMELINE_SECONDS = 5
CONNECTING = 64  # subscribers connecting at the same time


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.live",
        description="Live purchase updates over WebSocket: latency, memory, exactly-once, and "
        "HTTP with and without subscribers (see README.md in this folder).",
    )
    parser.add_argument("--subscribers", type=int, default=1000, help="WebSocket subscribers")
    parser.add_argument("--rate", type=float, default=200, help="fulfils per second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of measured fulfils")
    parser.add_argument(
        "--warmup", type=float, default=3, help="seconds of fulfils before the measured ones"
    )
    parser.add_argument(
        "--probe-rate",
        type=float,
        default=10,
        help="fulfils per second of the reference phase before the live phase (0: none)",
    )
    parser.add_argument(
        "--probe-duration", type=float, default=5, help="seconds of the reference phase"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=15,
        help="longest wait for notifications after the last fulfil answer",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=32,
        help="fulfil calls open at once per process at most (the payment backend's pool)",
    )
    parser.add_argument("--http-rounds", type=int, default=5, help="rounds of the HTTP check")
    parser.add_argument(
        "--http-duration", type=float, default=5, help="seconds per HTTP measurement"
    )
    parser.add_argument("--connections", type=int, default=32, help="HTTP keep-alive connections")
    parser.add_argument(
        "--http-load",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="the HTTP load generator (auto: wrk when installed, else an aiohttp loop)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("RPC_SERVER_TEST_DATABASE_URL") or DEFAULT_POSTGRES,
        help="a PostgreSQL server where a database may be created (dropped after the run)",
    )
    parser.add_argument(
        "--project-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra RPC_SERVER_* settings for both server processes",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"the Markdown report (default: {DEFAULT_OUTPUT.name} beside this file for a run "
        f"with the default measuring options, else {PARTIAL_OUTPUT})",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and database")
    parser.add_argument("--seed", type=int, default=20261127, help="random seed")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, flush=True)


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (any order); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Count, min, p50, p90, p99 and max of ``values`` (seconds), in milliseconds."""
    return {
        "n": len(values),
        "min": min(values) * 1000 if values else math.nan,
        "p50": percentile(values, 50) * 1000,
        "p90": percentile(values, 90) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": max(values) * 1000 if values else math.nan,
    }


# --- the database -------------------------------------------------------------------------


@dataclass(frozen=True)
class Buyer:
    email: str
    token: str
    user_id: int


@dataclass
class LiveData:
    url: str
    bulk: seed.PostgresBulk
    course: Any  # rpc_server.domain.records.Course
    buyers: list[Buyer]
    pending: dict[int, list[str]]  # buyer user_id -> their pending purchase ids, unused
    payments: Buyer  # the payment backend's token (payments scope)
    get_user: Buyer
    get_ids: list[str]
    idle_buyer: Buyer  # owns the purchases the HTTP fulfil rounds fulfil: no one watches
    seconds: float = 0.0


async def insert_pending(data: LiveData, owners: Iterable[tuple[int, int]]) -> dict[int, list[str]]:
    """``(user_id, count)`` new pending purchases each, in one COPY; return their ids."""
    now = datetime.now(UTC)
    course = data.course
    made: dict[int, list[str]] = {}
    records = []
    for owner_id, count in owners:
        ids = [os.urandom(16).hex() for _ in range(count)]
        made[owner_id] = ids
        records += [
            (pid, owner_id, course.pk, course.price, course.currency, "pending", now, now)
            for pid in ids
        ]
    await data.bulk.connection.copy_records_to_table(
        "purchases", records=records, columns=list(seed.PENDING_COLUMNS)
    )
    return made


async def prepare(url: str, buyers: int, per_buyer: int) -> LiveData:
    """Users and tokens (through the project's services), a course, the get user's
    purchases and each buyer's pending purchases."""
    started = time.monotonic()
    engine = open_engine(url)
    try:
        uow = SqlUnitOfWorkFactory(engine)
        course = await services.save_course(
            uow, slug="live-course", title="Live", price=Decimal("49.00"), currency="USD"
        )
        limit = asyncio.Semaphore(8)

        async def token(email: str, scope: Scope = Scope.BUYER) -> tuple[str, str]:
            async with limit:
                return email, await services.issue_token(uow, email, scope=scope)

        issued = await asyncio.gather(
            token("payments@live.bench.example", Scope.PAYMENTS),
            token("get@live.bench.example"),
            token("idle@live.bench.example"),
            *(token(f"buyer{n:05d}@live.bench.example") for n in range(buyers)),
        )
    finally:
        await engine.close()
    bulk = await seed.PostgresBulk.open(url)
    rows = await bulk.connection.fetch(
        "SELECT email, id FROM users WHERE email = ANY($1::text[])", [e for e, _ in issued]
    )
    ids = {row["email"]: int(row["id"]) for row in rows}
    users = [Buyer(email, value, ids[email]) for email, value in issued]
    payments, get_user, idle, *buyer_list = users
    data = LiveData(
        url=url,
        bulk=bulk,
        course=course,
        buyers=buyer_list,
        pending={},
        payments=payments,
        get_user=get_user,
        get_ids=[],
        idle_buyer=idle,
    )
    data.pending = await insert_pending(data, ((b.user_id, per_buyer) for b in buyer_list))
    await bulk.insert_history(get_user.user_id, GET_USER_PURCHASES, [course])
    data.get_ids = await bulk.purchase_ids(get_user.user_id, GET_USER_PURCHASES)
    await bulk.analyze()
    data.seconds = time.monotonic() - started
    return data


async def latest_seq(data: LiveData) -> int:
    value = await data.bulk.connection.fetchval("SELECT last_seq FROM event_sequence")
    return int(value or 0)


async def committed_events(data: LiveData, after: int, upto: int) -> list[tuple[int, int, str]]:
    """(seq, owner user id, public purchase id) of every event in ``(after, upto]``."""
    rows = await data.bulk.connection.fetch(
        "SELECT e.seq, p.owner_id, p.purchase_id FROM purchase_events e "
        "JOIN purchases p ON p.id = e.purchase_id WHERE e.seq > $1 AND e.seq <= $2 "
        "ORDER BY e.seq",
        after,
        upto,
    )
    return [(int(r["seq"]), int(r["owner_id"]), str(r["purchase_id"])) for r in rows]


# --- subscribers --------------------------------------------------------------------------


@dataclass
class Subscriber:
    """One buyer's WebSocket, subscribed to the buyer's purchases; it keeps every text
    frame it receives with the time it was read (parsed afterwards)."""

    buyer: Buyer
    server: int  # index of the process it is connected to
    socket: aiohttp.ClientWebSocketResponse | None = None
    subscription: str = ""
    connect_s: float = 0.0
    frames: list[tuple[float, str]] = field(default_factory=list)
    others: int = 0  # binary or error frames
    closed_by_us: bool = False
    close_code: int | None = None
    listener: asyncio.Task[None] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on every frame

    async def connect(self, session: aiohttp.ClientSession, url: str) -> None:
        started = time.perf_counter()
        self.socket = await session.ws_connect(
            url, headers={"Authorization": f"Bearer {self.buyer.token}"}, autoping=True
        )
        await self.socket.send_str(SUBSCRIBE)
        message = await asyncio.wait_for(self.socket.receive(), 30)
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"{self.buyer.email}: subscribe answered by {message.type!r}")
        answer = orjson.loads(message.data)
        if not isinstance(answer.get("result"), str):
            raise RuntimeError(f"{self.buyer.email}: purchase.subscribe answered {answer}")
        self.subscription = answer["result"]
        self.connect_s = time.perf_counter() - started
        self.listener = asyncio.create_task(self.listen())

    async def listen(self) -> None:
        socket = self.socket
        assert socket is not None
        async for message in socket:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.frames.append((time.perf_counter(), message.data))
                self.arrived.set()
            else:
                self.others += 1
        self.close_code = socket.close_code

    async def close(self) -> None:
        self.closed_by_us = True
        if self.socket is not None:
            await self.socket.close()
        if self.listener is not None:
            await self.listener

    @property
    def dropped(self) -> bool:
        """Closed by the server (or the network) while we still listened."""
        return self.listener is not None and self.listener.done() and not self.closed_by_us


class Crowd:
    """The subscribers: connected together, split evenly across the processes."""

    def __init__(self, buyers: Sequence[Buyer], urls: Sequence[str]):
        self.urls = [url.replace("http://", "ws://") for url in urls]
        self.arrived = asyncio.Event()
        self.members = [
            Subscriber(b, n % len(urls), arrived=self.arrived) for n, b in enumerate(buyers)
        ]
        self.session: aiohttp.ClientSession | None = None
        self.connect_s = 0.0

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        limit = asyncio.Semaphore(CONNECTING)
        started = time.perf_counter()

        async def one(member: Subscriber) -> None:
            async with limit:
                assert self.session is not None
                await member.connect(self.session, self.urls[member.server])

        await asyncio.gather(*(one(m) for m in self.members))
        self.connect_s = time.perf_counter() - started

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.members))
        if self.session is not None:
            await self.session.close()

    def frames(self) -> int:
        return sum(len(m.frames) for m in self.members)

    async def wait_frames(self, count: int, within: float) -> None:
        """Until the subscribers hold ``count`` frames in all, or ``within`` seconds passed."""
        deadline = time.perf_counter() + within
        while self.frames() < count and (left := deadline - time.perf_counter()) > 0:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)


# --- the live phase -----------------------------------------------------------------------


@dataclass
class Fulfil:
    """One planned purchase.fulfill: which purchase (whose buyer), on which process."""

    purchase_id: str
    owner_id: int
    server: int
    measured: bool
    due: float = math.nan
    sent: float = math.nan
    answered: float = math.nan
    error: str = ""


def plan_fulfils(
    data: LiveData, rate: float, warmup: float, duration: float, servers_count: int, seed_: int
) -> list[Fulfil]:
    """Call k goes to process k % 2 and fulfils a purchase of the buyer at k % buyers in a
    shuffled order: each buyer is fulfilled for about as often, and its process is the
    fulfil's one for about half of the calls."""
    order = list(data.buyers)
    random.Random(seed_).shuffle(order)
    warm = round(rate * warmup)
    total = warm + round(rate * duration)
    plan = []
    for k in range(total):
        buyer = order[k % len(order)]
        pid = data.pending[buyer.user_id].pop()
        plan.append(Fulfil(pid, buyer.user_id, k % servers_count, k >= warm))
    return plan


async def watch_loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late this process's event loop wakes a 5 ms timer: how late it reads frames."""
    expected = time.perf_counter() + LAG_INTERVAL
    while not stop.is_set():
        await asyncio.sleep(LAG_INTERVAL)
        now = time.perf_counter()
        lags.append(max(0.0, now - expected))
        expected = now + LAG_INTERVAL


async def drive(
    plan: list[Fulfil], urls: Sequence[str], payments: Buyer, rate: float, in_flight: int
) -> float:
    """Send the plan at ``rate`` (call k is due k / rate after the start, whatever the
    answers do), with at most ``in_flight`` calls open per process, as a payment backend's
    connection pool would (beyond it a due call waits: its delay is its ``sent`` minus its
    ``due``); return the seconds from the start to the last answer."""
    headers = {"Authorization": f"Bearer {payments.token}", "Content-Type": "application/json"}
    slots = [asyncio.Semaphore(in_flight) for _ in urls]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fulfil(number: int, call: Fulfil) -> None:
            body = rpc(
                "purchase.fulfill",
                {"purchase_id": call.purchase_id, "purchase_state": "fulfilled"},
                number,
            )
            async with slots[call.server]:
                call.sent = time.perf_counter()
                try:
                    async with session.post(urls[call.server], data=body, headers=headers) as got:
                        raw = await got.read()
                    call.answered = time.perf_counter()
                    result = orjson.loads(raw).get("result") if got.status == 200 else None
                    purchase = result.get("purchase") if isinstance(result, dict) else None
                    if not isinstance(purchase, dict) or purchase.get("state") != "fulfilled":
                        call.error = f"HTTP {got.status}: {raw[:200].decode(errors='replace')}"
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    call.answered = time.perf_counter()
                    call.error = repr(exc)

        started = time.perf_counter()
        tasks = []
        for number, call in enumerate(plan):
            call.due = started + number / rate
            delay = call.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fulfil(number, call)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - started


@dataclass
class Delivery:
    """What the subscribers received against what was committed."""

    expected: int = 0
    received: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0  # not an event of this buyer's purchases in the run
    wrong_content: int = 0  # subscription id, purchase id or state not as committed
    out_of_order: int = 0
    other_frames: int = 0  # anything but purchase.updated (resync, answers, binary)
    dropped_sockets: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    subscribers_complete: int = 0


def check_delivery(
    crowd: Crowd, events: list[tuple[int, int, str]]
) -> tuple[Delivery, dict[str, float]]:
    """Match every subscriber's frames with the committed events of its buyer; return the
    counts and, per purchase id, the arrival time of its (first) notification."""
    by_owner: dict[int, dict[int, str]] = {}
    for seq, owner, pid in events:
        by_owner.setdefault(owner, {})[seq] = pid
    delivery = Delivery()
    arrivals: dict[str, float] = {}
    closes: Counter[str] = Counter()
    for member in crowd.members:
        expected = by_owner.get(member.buyer.user_id, {})
        delivery.expected += len(expected)
        delivery.other_frames += member.others
        seen: Counter[int] = Counter()
        last_seq = 0
        for arrival, text in member.frames:
            message = orjson.loads(text)
            params = message.get("params") or {}
            if message.get("method") != "purchase.updated":
                delivery.other_frames += 1
                continue
            delivery.received += 1
            result = params.get("result") or {}
            seq = int(result.get("seq", -1))
            event = result.get("event") or {}
            if seq not in expected:
                delivery.unexpected += 1
                continue
            if (
                params.get("subscription") != member.subscription
                or event.get("seq") != seq
                or event.get("purchase_id") != expected[seq]
                or event.get("to_state") != "fulfilled"
                or (result.get("purchase") or {}).get("purchase_id") != expected[seq]
            ):
                delivery.wrong_content += 1
            seen[seq] += 1
            if seq < last_seq:
                delivery.out_of_order += 1
            last_seq = max(last_seq, seq)
            arrivals.setdefault(expected[seq], arrival)
        delivery.duplicates += sum(count - 1 for count in seen.values() if count > 1)
        missing = sum(1 for seq in expected if seq not in seen)
        delivery.missing += missing
        delivery.subscribers_complete += missing == 0
        if member.dropped:
            delivery.dropped_sockets += 1
            closes[str(member.close_code)] += 1
    delivery.close_codes = dict(closes)
    return delivery, arrivals


# --- HTTP throughput ----------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRun:
    workload: str  # "get" or "fulfill"
    subscribers: int  # connected (idle) during the run
    round: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    exhausted: int
    cpu_a_s: float  # process A's CPU seconds during the run
    cpu_b_s: float  # process B's (it reads every event the fulfils commit on A)


async def aiohttp_load(
    url: str, requests: Sequence[tuple[str, bytes]], seconds: float, connections: int, consume: bool
) -> loadgen.LoadResult:
    """A closed loop of ``connections`` clients, the fallback when wrk is not installed
    (a Python client saturates before the server does: the ratios still compare)."""
    latencies: list[float] = []
    errors = exhausted = 0
    position = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors, exhausted, position
            while time.perf_counter() < deadline:
                if position >= len(requests):
                    exhausted += consume
                    position = 0
                authorization, body = requests[position]
                position += 1
                headers = {"Authorization": authorization, "Content-Type": "application/json"}
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        raw = await answer.read()
                    if answer.status != 200 or b'"error":{"code":' in raw:
                        errors += 1
                except (aiohttp.ClientError, OSError):
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return loadgen.LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p90_ms=percentile(latencies, 90) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else math.nan,
        socket_errors=0,
        rpc_errors=errors,
        http_errors=0,
        exhausted=exhausted,
        fallbacks=0,
    )


class HttpCheck:
    """purchase.get and purchase.fulfill at saturation on process A."""

    def __init__(
        self, data: LiveData, processes: Sequence[servers.ServerProcess], args: argparse.Namespace
    ):
        self.data = data
        self.processes = processes
        self.args = args
        self.workdir: Path = args.workdir
        self.use_wrk = args.http_load == "wrk" or (
            args.http_load == "auto" and shutil.which("wrk") is not None
        )
        self.rate = FIRST_GUESS_RPS
        self.rng = random.Random(args.seed + 1)
        self.plans = 0

    @property
    def tool(self) -> str:
        return "wrk" if self.use_wrk else "aiohttp loop (wrk not installed)"

    async def requests(self, workload: str, seconds: float) -> list[tuple[str, bytes]]:
        if workload == "get":
            auth = f"Bearer {self.data.get_user.token}"
            return [
                (auth, rpc("purchase.get", {"purchase_id": self.rng.choice(self.data.get_ids)}, i))
                for i in range(1000)
            ]
        count = math.ceil(self.rate * 1.5 * (seconds + 1)) + 500
        owner = self.data.idle_buyer.user_id
        ids = (await insert_pending(self.data, [(owner, count)]))[owner]
        auth = f"Bearer {self.data.payments.token}"
        return [
            (auth, rpc("purchase.fulfill", {"purchase_id": pid, "purchase_state": "fulfilled"}, i))
            for i, pid in enumerate(ids)
        ]

    async def measure(
        self, workload: str, subscribers: int, round_: int, seconds: float
    ) -> HttpRun:
        a, b = self.processes
        requests = await self.requests(workload, seconds)
        consume = workload == "fulfill"
        cpu_a, cpu_b = a.cpu_seconds(), b.cpu_seconds()
        if self.use_wrk:
            self.plans += 1
            plan = loadgen.write_replay_plan(
                self.workdir / f"http-{self.plans}-{workload}.plan", requests, consume=consume
            )
            result = await loadgen.run_wrk(
                a.url,
                script=loadgen.REPLAY_SCRIPT,
                plan=plan,
                result=plan.with_suffix(".json"),
                seconds=seconds,
                connections=self.args.connections,
                threads=1,
                cpus=None,
            )
        else:
            result = await aiohttp_load(a.url, requests, seconds, self.args.connections, consume)
        cpu_a, cpu_b = a.cpu_seconds() - cpu_a, b.cpu_seconds() - cpu_b
        if consume:
            self.rate = max(self.rate, result.rps)
        await settle(self.data, self.processes)
        for process in self.processes:
            if not process.alive():
                raise RuntimeError(f"{process.role} died:\n{process.log_tail()}")
        return HttpRun(
            workload=workload,
            subscribers=subscribers,
            round=round_,
            seconds=result.seconds,
            requests=result.requests,
            rps=result.rps,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            errors=result.socket_errors + result.http_errors + result.rpc_errors,
            exhausted=result.exhausted,
            cpu_a_s=cpu_a,
            cpu_b_s=cpu_b,
        )


async def settle(data: LiveData, processes: Sequence[servers.ServerProcess]) -> None:
    """Let the servers finish what a load queued: receipts sent, then CPU idle, then the
    receipts of requests that committed after the load stopped."""
    await wait_outbox_drained(data.bulk, 300)
    for process in processes:
        await process.wait_idle()
    await wait_outbox_drained(data.bulk, 300)


# --- the run ------------------------------------------------------------------------------


def rss_mib(process: servers.ServerProcess) -> float:
    return process.rss_kib() / 1024


async def rss_steady(processes: Sequence[servers.ServerProcess]) -> list[float]:
    """Each process's RSS once it is idle: the median of five samples 0.1 s apart."""
    for process in processes:
        await process.wait_idle()
    samples: list[list[float]] = [[] for _ in processes]
    for _ in range(5):
        for n, process in enumerate(processes):
            samples[n].append(rss_mib(process))
        await asyncio.sleep(0.1)
    return [statistics.median(s) for s in samples]


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / servers.CLOCK_TICKS, total / servers.CLOCK_TICKS


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds so far of PostgreSQL's processes that serve ``database`` or the whole
    server (WAL writer, checkpointer, …), by pid; not the backends of other databases."""
    seconds: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            backend = "(" in title or "[local]" in title  # a client's: "… 127.0.0.1(5432) …"
            if backend and f" {database} " not in title:
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / servers.CLOCK_TICKS
    return seconds


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def machine_facts(postgres_version: str, http_tool: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    versions = {}
    for package in ("aiohttp", "asyncpg", "SQLAlchemy", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "python": platform.python_version(),
        "postgresql": postgres_version,
        "versions": versions,
        "http_load": http_tool,
    }


class LiveBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.record: dict[str, Any] = {"notes": []}
        self.env = dict(item.split("=", 1) for item in args.project_env)

    def note(self, text: str) -> None:
        log(f"  note: {text}")
        self.record["notes"].append(text)

    async def run(self) -> None:
        args = self.args
        admin = args.postgres_url
        url = await seed.create_database("postgresql", args.workdir, admin)
        try:
            await self.with_database(url)
        finally:
            if not args.keep:
                await seed.drop_database(url, admin)

    async def with_database(self, url: str) -> None:
        args = self.args
        total = round(args.rate * args.warmup) + round(args.rate * args.duration)
        total += round(args.probe_rate * args.probe_duration)
        per_buyer = math.ceil(total / args.subscribers) + 1
        log(f"preparing {args.subscribers:,} buyers with {per_buyer} pending purchases each …")
        data = await prepare(url, args.subscribers, per_buyer)
        log(f"  prepared in {data.seconds:.1f} s")
        try:
            processes = [
                servers.project_server(
                    url,
                    args.workdir,
                    None,
                    {**self.env, "RPC_SERVER_MAIL_DIR": str(args.workdir / f"mail-{name}")},
                    name=f"live-{name}",
                )
                for name in ("a", "b")
            ]
            for process in processes:
                process.role = process.log_path.stem
            try:
                for process in processes:
                    process.start()
                await self.measure(data, processes)
            finally:
                for process in processes:
                    process.stop()
        finally:
            await data.bulk.close()

    async def measure(self, data: LiveData, processes: list[servers.ServerProcess]) -> None:
        args = self.args
        record = self.record
        version = await data.bulk.connection.fetchval("SHOW server_version")
        http = HttpCheck(data, processes, args)
        record["facts"] = machine_facts(str(version), http.tool)
        record["load_average_start"] = load_average()
        record["settings"] = {
            k: getattr(args, k)
            for k in (*MEASURING, "grace", "connections", "http_load", "project_env", "seed")
        }
        urls = [p.url for p in processes]

        log("warming up both processes (purchase.get and purchase.fulfill, 2 s each) …")
        warm = HttpCheck(data, processes, args)
        for process in (processes[1], processes[0]):
            warm.processes = [process, *(p for p in processes if p is not process)]
            for workload in ("get", "fulfill"):
                await warm.measure(workload, 0, 0, 2)
        http.rate = warm.rate

        rss_before = await rss_steady(processes)
        log(f"RSS before subscribers: {', '.join(f'{r:.1f}' for r in rss_before)} MiB")
        crowd = Crowd(data.buyers, urls)
        log(f"connecting {len(crowd.members):,} subscribers …")
        await crowd.connect()
        rss_with = await rss_steady(processes)
        per_process = Counter(m.server for m in crowd.members)
        log(
            f"  connected and subscribed in {crowd.connect_s:.1f} s; RSS "
            f"{', '.join(f'{r:.1f}' for r in rss_with)} MiB"
        )
        connect_times = [m.connect_s for m in crowd.members]
        record["memory"] = {
            "subscribers_per_process": [per_process[n] for n in range(len(processes))],
            "rss_before_mib": rss_before,
            "rss_with_mib": rss_with,
            "mib_per_1000": [
                (w - b) / per_process[n] * 1000 if per_process[n] else math.nan
                for n, (b, w) in enumerate(zip(rss_before, rss_with, strict=True))
            ],
            "connect_all_s": crowd.connect_s,
            "connect_one_ms": distribution(connect_times),
        }

        if args.probe_rate > 0:
            log(f"reference phase: {args.probe_rate:g} fulfils/s for {args.probe_duration:g} s …")
            record["probe"] = await self.phase(
                data, processes, crowd, args.probe_rate, 0, args.probe_duration
            )
            await settle(data, processes)
        log(
            f"live phase: {args.rate:g} fulfils/s for {args.warmup:g} + {args.duration:g} s, "
            "alternating processes …"
        )
        for process in processes:
            process.reset_peak()
        record["live"] = await self.phase(
            data, processes, crowd, args.rate, args.warmup, args.duration
        )
        record["memory"]["rss_after_live_mib"] = [rss_mib(p) for p in processes]
        record["memory"]["peak_during_live_mib"] = [p.peak_rss_kib() / 1024 for p in processes]
        await crowd.close()
        await settle(data, processes)

        log(
            f"HTTP check on process A ({http.tool}): {args.http_rounds} rounds of "
            f"{args.http_duration:.0f} s per workload, without and with "
            f"{args.subscribers:,} idle subscribers …"
        )
        runs: list[HttpRun] = []
        idle_frames = idle_dropped = 0
        rss_track: list[dict[str, Any]] = [
            {
                "when": "after the live phase, subscribers closed",
                "rss_mib": await rss_steady(processes),
            }
        ]
        for round_ in range(1, args.http_rounds + 1):
            order = (0, args.subscribers) if round_ % 2 else (args.subscribers, 0)
            for count in order:
                idle = None
                if count:
                    idle = Crowd(data.buyers, urls)
                    await idle.connect()
                    rss_track.append(
                        {
                            "when": f"round {round_}: connected",
                            "rss_mib": await rss_steady(processes),
                        }
                    )
                for workload in ("get", "fulfill"):
                    run = await http.measure(workload, count, round_, args.http_duration)
                    runs.append(run)
                    log(
                        f"  round {round_} {workload:>7} with {count:>5} subscribers: "
                        f"{run.rps:8,.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
                        f"  errors {run.errors}  exhausted {run.exhausted}"
                    )
                    if run.errors or run.exhausted:
                        self.note(
                            f"HTTP {workload} round {round_} with {count} subscribers: "
                            f"errors {run.errors}, exhausted {run.exhausted}"
                        )
                if idle is not None:
                    idle_frames += idle.frames()
                    idle_dropped += sum(1 for m in idle.members if m.dropped)
                    await idle.close()
                    rss_track.append(
                        {"when": f"round {round_}: closed", "rss_mib": await rss_steady(processes)}
                    )
        record["http"] = {
            "tool": http.tool,
            "runs": [asdict(r) for r in runs],
            "idle_frames": idle_frames,
            "idle_dropped": idle_dropped,
        }
        record["memory"]["track"] = rss_track
        record["load_average_end"] = load_average()
        if idle_frames or idle_dropped:
            self.note(
                f"idle subscribers got {idle_frames} frames and {idle_dropped} sockets were "
                "closed by the server during the HTTP check (expected: none)"
            )

    async def phase(
        self,
        data: LiveData,
        processes: list[servers.ServerProcess],
        crowd: Crowd,
        rate: float,
        warmup: float,
        duration: float,
    ) -> dict[str, Any]:
        """Fulfils at ``rate`` for ``warmup`` + ``duration`` seconds, then the check that
        every subscriber got its notifications once; return the phase's figures."""
        args = self.args
        seq_start = await latest_seq(data)
        for member in crowd.members:
            member.frames.clear()
        plan = plan_fulfils(data, rate, warmup, duration, len(processes), args.seed)
        cpu_before = [p.cpu_seconds() for p in processes]
        own_cpu = time.process_time()
        busy_before = machine_busy()
        database = make_url(data.url).database or ""
        postgres_before = postgres_cpu(database)
        lags: list[float] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_loop_lag(stop, lags))
        try:
            urls = [p.url for p in processes]
            elapsed = await drive(plan, urls, data.payments, rate, args.in_flight)
        finally:
            stop.set()
            await watcher
        cpu_used = [p.cpu_seconds() - c for p, c in zip(processes, cpu_before, strict=True)]
        own_used = time.process_time() - own_cpu
        busy, total = (
            after - before for after, before in zip(machine_busy(), busy_before, strict=True)
        )
        postgres_used = sum(
            seconds - postgres_before.get(pid, 0.0)
            for pid, seconds in postgres_cpu(database).items()
        )
        answered_ok = sum(1 for call in plan if not call.error)
        await crowd.wait_frames(answered_ok, args.grace)
        # Late duplicates would come right behind the last notifications.
        await asyncio.sleep(1.0)
        events = await committed_events(data, seq_start, await latest_seq(data))
        delivery, arrivals = check_delivery(crowd, events)
        figures = self.summarize(plan, delivery, arrivals, crowd, elapsed, lags)
        figures["server_cpu_share"] = [c / elapsed for c in cpu_used]
        figures["loadgen_cpu_share"] = own_used / elapsed
        figures["server_cpu_us_per_fulfil"] = sum(cpu_used) * 1e6 / len(plan)
        figures["machine_busy_share"] = busy / total if total else math.nan
        figures["postgres_cpu_share"] = postgres_used / elapsed
        # Busy core-seconds per second that none of the above accounts for.
        # (approximate: /proc/stat and the processes' counters tick apart; never below 0)
        accounted = (sum(cpu_used) + own_used + postgres_used) / elapsed
        figures["other_cpu_share"] = max(0.0, busy / total * (os.cpu_count() or 1) - accounted)
        figures["events_committed"] = len(events)
        figures["rate"] = rate
        figures["warmup"] = warmup
        figures["duration"] = duration
        return figures

    def summarize(
        self,
        plan: list[Fulfil],
        delivery: Delivery,
        arrivals: dict[str, float],
        crowd: Crowd,
        elapsed: float,
        lags: list[float],
    ) -> dict[str, Any]:
        server_of = {m.buyer.user_id: m.server for m in crowd.members}
        after_answer: dict[str, list[float]] = {"all": [], "same": [], "other": []}
        after_send: dict[str, list[float]] = {"all": [], "same": [], "other": []}
        call_times = []
        measured = [call for call in plan if call.measured]
        for call in measured:
            call_times.append(call.answered - call.sent)
            arrival = arrivals.get(call.purchase_id)
            if arrival is None or call.error:
                continue
            where = "same" if server_of[call.owner_id] == call.server else "other"
            for kind in ("all", where):
                after_answer[kind].append(arrival - call.answered)
                after_send[kind].append(arrival - call.sent)
        errors = Counter(call.error[:120] for call in plan if call.error)
        for error, count in errors.most_common(5):
            self.note(f"fulfil failed {count} times: {error}")
        slips = [call.sent - call.due for call in measured]
        figures = {
            "subscriber_kind": "buyer tokens, each subscribed to its own purchases "
            "(purchase.subscribe {}: no purchase_id, no since)",
            "fulfils_planned": len(plan),
            "fulfils_measured": len(measured),
            "fulfil_errors": sum(errors.values()),
            "elapsed_s": elapsed,
            "achieved_rate": len(plan) / elapsed if elapsed else math.nan,
            "send_slip_ms": distribution(slips),
            "fulfil_call_ms": distribution(call_times),
            "notification_minus_answer_ms": {k: distribution(v) for k, v in after_answer.items()},
            "notification_minus_send_ms": {k: distribution(v) for k, v in after_send.items()},
            "negative_after_answer": sum(1 for v in after_answer["all"] if v < 0),
            "loop_lag_ms": distribution(lags),
            "delivery": asdict(delivery),
            "timeline": timeline(plan, arrivals),
        }
        d = delivery
        log(
            f"  {len(plan):,} fulfils in {elapsed:.1f} s ({len(plan) / elapsed:.0f}/s), "
            f"{sum(errors.values())} failed; notifications expected {d.expected:,}, received "
            f"{d.received:,}, missing {d.missing}, duplicates {d.duplicates}, unexpected "
            f"{d.unexpected}, wrong {d.wrong_content}, out of order {d.out_of_order}, "
            f"dropped sockets {d.dropped_sockets}"
        )
        a, s = after_answer["all"], after_send["all"]
        log(
            f"  notification - answer: p50 {percentile(a, 50) * 1000:.2f} ms, p99 "
            f"{percentile(a, 99) * 1000:.2f} ms; notification - send: p50 "
            f"{percentile(s, 50) * 1000:.2f} ms, p99 {percentile(s, 99) * 1000:.2f} ms"
        )
        return figures


def timeline(plan: list[Fulfil], arrivals: dict[str, float]) -> list[dict[str, Any]]:
    """The phase in slices of TIMELINE_SECONDS by due time: how late calls left, how long
    they took, and both bounds of commit to notification (milliseconds, p50 and p99)."""
    start = plan[0].due
    slices: dict[int, list[Fulfil]] = {}
    for call in plan:
        slices.setdefault(int((call.due - start) // TIMELINE_SECONDS), []).append(call)
    rows = []
    for number, calls in sorted(slices.items()):
        answered = [c for c in calls if not c.error and c.purchase_id in arrivals]
        figures = {
            "late": [c.sent - c.due for c in calls],
            "call": [c.answered - c.sent for c in calls],
            "after_answer": [arrivals[c.purchase_id] - c.answered for c in answered],
            "after_send": [arrivals[c.purchase_id] - c.sent for c in answered],
        }
        row: dict[str, Any] = {"from_s": number * TIMELINE_SECONDS, "calls": len(calls)}
        for name, values in figures.items():
            row[name] = [percentile(values, 50) * 1000, percentile(values, 99) * 1000]
        rows.append(row)
    return rows


# --- the report ---------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def _row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def cpu_per_call(run: dict[str, Any], process: str) -> float:
    """Microseconds of process ``a`` or ``b``'s CPU per call of an HTTP measurement on A."""
    return float(run[f"cpu_{process}_s"]) * 1e6 / run["requests"] if run["requests"] else math.nan


def _medians(
    without: dict[int, dict[str, Any]],
    with_: dict[int, dict[str, Any]],
    value: Callable[[dict[str, Any]], float],
) -> tuple[float, float]:
    return (
        float(statistics.median(value(r) for r in without.values())),
        float(statistics.median(value(r) for r in with_.values())),
    )


def http_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload: medians without / with subscribers, per-round ratios and theirs."""
    summary = {}
    for workload in ("get", "fulfill"):
        mine = [r for r in runs if r["workload"] == workload]
        rounds = sorted({r["round"] for r in mine})
        without = {r["round"]: r for r in mine if r["subscribers"] == 0}
        with_ = {r["round"]: r for r in mine if r["subscribers"] > 0}
        ratios = [with_[n]["rps"] / without[n]["rps"] for n in rounds if without[n]["rps"]]
        cpu_ratios = [
            cpu_per_call(without[n], "a") / cpu_per_call(with_[n], "a")
            for n in rounds
            if with_[n]["requests"] and without[n]["requests"]
        ]

        summary[workload] = {
            "rps": _medians(without, with_, lambda r: r["rps"]),
            "ratios": ratios,
            "ratio": statistics.median(ratios) if ratios else math.nan,
            "cpu_a": _medians(without, with_, lambda r: cpu_per_call(r, "a")),
            "cpu_b": _medians(without, with_, lambda r: cpu_per_call(r, "b")),
            "cpu_ratios": cpu_ratios,
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else math.nan,
            "p50": _medians(without, with_, lambda r: r["p50_ms"]),
            "p99": _medians(without, with_, lambda r: r["p99_ms"]),
            "errors": sum(r["errors"] for r in mine),
        }
    return summary


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The headline figures, each pointing at its section."""
    live, memory, settings = data["live"], data["memory"], data["settings"]
    answer = live["notification_minus_answer_ms"]["all"]
    send = live["notification_minus_send_ms"]["all"]
    d = live["delivery"]
    http = http_summary(data["http"]["runs"])
    lines = ["## Summary", ""]
    if "probe" in data:
        probe = data["probe"]
        lines.append(
            f"- Commit to notification at {probe['rate']:g} fulfils/s (far from "
            f"saturation): between {_ms(probe['notification_minus_answer_ms']['all']['p50'])} and "
            f"{_ms(probe['notification_minus_send_ms']['all']['p50'])} ms at p50, between "
            f"{_ms(probe['notification_minus_answer_ms']['all']['p99'])} and "
            f"{_ms(probe['notification_minus_send_ms']['all']['p99'])} ms at p99."
        )
    lines += [
        f"- At {settings['rate']:g} fulfils/s ({live['achieved_rate']:.0f}/s achieved"
        + (
            ": calls queued for an open slot"
            if live["achieved_rate"] < 0.98 * settings["rate"]
            else ""
        )
        + f"; the machine was {live['machine_busy_share']:.0%} busy): between "
        f"{_ms(answer['p50'])} and {_ms(send['p50'])} ms at p50, between {_ms(answer['p99'])} "
        f"and {_ms(send['p99'])} ms at p99 (after the answer / after the send).",
        f"- Exactly once: {d['received']:,} of {d['expected']:,} notifications received, "
        f"{d['missing']} missing, {d['duplicates']} duplicated, {d['unexpected']} outside "
        f"their scope, {d['out_of_order']} out of order, {d['dropped_sockets']} sockets closed "
        "by a server.",
        "- Memory: "
        + ", ".join(
            f"{name} {value:.1f} MiB"
            for name, value in zip("AB", memory["mib_per_1000"], strict=False)
        )
        + " per 1,000 connected subscribers.",
        "- HTTP with the subscribers connected and idle, over without (median of per-round "
        "ratios; throughput, then CPU per call): "
        + "; ".join(
            f"purchase.{w} {row['ratio']:.2f} / {row['cpu_ratio']:.2f}" for w, row in http.items()
        )
        + ".",
        "",
    ]
    return lines


def render(data: dict[str, Any]) -> str:
    facts, settings = data["facts"], data["settings"]
    live, memory, http = data["live"], data["memory"], data["http"]
    lines = [
        "# Live updates: WebSocket notifications across two processes",
        "",
        f"Written by `.venv/bin/python -m tests.benchmarks.live` on {facts['date']} "
        '(see the "live updates" section of [README.md](README.md)).',
        "",
        f"**Machine**: {facts['cpus']} cores ({facts['cpu_model']}), {facts['memory']}; "
        f"PostgreSQL {facts['postgresql']} on the same machine; Python {facts['python']}, "
        + ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
        + f". Load average {data['load_average_start']:.2f} at the start, "
        f"{data['load_average_end']:.2f} at the end. **Nothing is pinned**: the two server "
        "processes, PostgreSQL and the load generator (this one Python process: the "
        "subscribers, the fulfils, the checks) share the two cores, so every latency below "
        "includes waiting for a CPU, and the machine may have been shared with other work.",
        "",
        f"**Setup**: a fresh database; two `rpc-server serve` processes (A and B) with the "
        "product's defaults (receipt deliverer on, INFO access log, rate limits on but raised "
        f"out of the load's reach); {settings['subscribers']:,} subscribers, "
        f"{live['subscriber_kind']}, connected alternately to A and B "
        f"({memory['subscribers_per_process'][0]} / {memory['subscribers_per_process'][1]}), "
        "authenticated by `Authorization: Bearer` on the upgrade. The payment backend (one "
        "payments-scope token) sends `purchase.fulfill` over HTTP at "
        f"{settings['rate']:.0f}/s on a fixed schedule, alternately to A and B, at most "
        f"{settings['in_flight']} calls open per process (a due call waits for one: "
        '"sent late" below), for '
        f"{settings['warmup']:.0f} s of warm-up then {settings['duration']:.0f} s measured; "
        "each call fulfils a pending purchase of the next buyer in a shuffled order, so each "
        "buyer gets about the same number of notifications and about half of them come from "
        "the process the buyer is not connected to.",
        "",
        *summary_lines(data),
        "## Commit to notification",
        "",
        "The commit happens inside the fulfil call: after its request is sent and before its "
        "answer arrives. Both bounds are measured in the load generator with one clock: "
        "*after answer* = notification arrival - fulfil answer arrival (a lower bound; "
        "negative when the notification overtook the answer), *after send* = notification "
        "arrival - fulfil request send (an upper bound). Measured calls only, milliseconds; "
        "the first rows are a reference phase at a rate the machine is far from saturated "
        "by, before the live phase.",
        "",
        _row(["phase", "bound", "subscriber on", "n", "min", "p50", "p90", "p99", "max"]),
        _row(["---"] * 3 + ["---:"] * 6),
    ]
    labels = {"all": "either process", "same": "the fulfil's process", "other": "the other"}
    phases: list[tuple[dict[str, Any], tuple[str, ...]]] = []
    if "probe" in data:
        phases.append((data["probe"], ("all",)))
    phases.append((live, ("all", "same", "other")))
    for phase, places in phases:
        for title, key in (
            ("after answer", "notification_minus_answer_ms"),
            ("after send", "notification_minus_send_ms"),
        ):
            for where in places:
                d = phase[key][where]
                lines.append(
                    _row(
                        [f"{phase['rate']:g}/s", title, labels[where], f"{d['n']:,}"]
                        + [_ms(d[q]) for q in ("min", "p50", "p90", "p99", "max")]
                    )
                )
    lines += [
        "",
        "Negative *after answer*: "
        + "; ".join(
            f"at {phase['rate']:g}/s {phase['negative_after_answer']:,} of "
            f"{phase['notification_minus_answer_ms']['all']['n']:,}"
            for phase, _places in phases
        )
        + " notifications arrived before their fulfil's answer was read.",
        "",
        "For reading the above (p50 / p99 / max, ms):",
        "",
        _row(["figure", *(f"{phase['rate']:g}/s" for phase, _places in phases)]),
        _row(["---"] + ["---:"] * len(phases)),
    ]
    for title, key in (
        ("fulfil call, send to answer", "fulfil_call_ms"),
        ("fulfil sent late against its schedule", "send_slip_ms"),
        ("load generator's event loop lag (a 5 ms timer)", "loop_lag_ms"),
    ):
        lines.append(
            _row(
                [title]
                + [
                    " / ".join(_ms(phase[key][q]) for q in ("p50", "p99", "max"))
                    for phase, _places in phases
                ]
            )
        )
    for title, key in (
        ("CPU, share of one core: A, B, load generator, PostgreSQL, other work", ""),
        ("servers' CPU per fulfil, µs (A + B, receipts and notifications included)", "cpu"),
        ("whole machine busy", "machine_busy_share"),
    ):
        cells = []
        for phase, _places in phases:
            if not key:
                shares = [
                    *phase["server_cpu_share"],
                    phase["loadgen_cpu_share"],
                    phase["postgres_cpu_share"],
                    phase["other_cpu_share"],
                ]
                cells.append(", ".join(f"{v:.0%}" for v in shares))
            elif key == "cpu":
                cells.append(f"{phase['server_cpu_us_per_fulfil']:,.0f}")
            else:
                cells.append(f"{phase[key]:.0%} of {facts['cpus']} cores")
        lines.append(_row([title, *cells]))
    lines += [
        "",
        f"{live['fulfils_planned']:,} fulfils ({live['fulfils_measured']:,} measured) in "
        f"{live['elapsed_s']:.1f} s: {live['achieved_rate']:.0f}/s; {live['fulfil_errors']} "
        "failed.",
        "",
        f"Through the phase, by due time in slices of {TIMELINE_SECONDS} s (the first "
        f"{settings['warmup']:.0f} s are the warm-up), p50 / p99 in ms:",
        "",
        _row(["from s", "calls", "sent late", "fulfil call", "after answer", "after send"]),
        _row(["---:"] * 6),
    ]
    for row in live["timeline"]:
        lines.append(
            _row(
                [row["from_s"], f"{row['calls']:,}"]
                + [
                    f"{_ms(row[k][0])} / {_ms(row[k][1])}"
                    for k in ("late", "call", "after_answer", "after_send")
                ]
            )
        )
    lines += [
        "",
        "## Every notification exactly once",
        "",
        "Expected: every event committed during each phase (read back from `purchase_events`) "
        "of a subscribed buyer's purchases, on that buyer's socket, once, in seq order.",
        "",
    ]
    lines += [
        _row(
            [
                "phase",
                "expected",
                "received",
                "missing",
                "duplicates",
                "unexpected",
                "wrong content",
                "out of order",
                "other frames",
                "sockets closed by the server",
                "subscribers with all theirs",
                "fulfils answered without error",
            ]
        ),
        _row(["---"] + ["---:"] * 11),
    ]
    for phase, _places in phases:
        d = phase["delivery"]
        lines.append(
            _row(
                [
                    f"{phase['rate']:g}/s",
                    f"{d['expected']:,}",
                    f"{d['received']:,}",
                    d["missing"],
                    d["duplicates"],
                    d["unexpected"],
                    d["wrong_content"],
                    d["out_of_order"],
                    d["other_frames"],
                    f"{d['dropped_sockets']}"
                    + (f" (codes {d['close_codes']})" if d["close_codes"] else ""),
                    f"{d['subscribers_complete']:,} / {settings['subscribers']:,}",
                    f"{phase['fulfils_planned'] - phase['fulfil_errors']:,}",
                ]
            )
        )
    lines += [
        "",
        "## Memory",
        "",
        "RSS (VmRSS) of each process once idle, median of five samples.",
        "",
        _row(["", "A", "B"]),
        _row(["---", "---:", "---:"]),
        _row(["subscribers", *memory["subscribers_per_process"]]),
        _row(["RSS before subscribers (MiB)"] + [f"{v:.1f}" for v in memory["rss_before_mib"]]),
        _row(["RSS with them connected (MiB)"] + [f"{v:.1f}" for v in memory["rss_with_mib"]]),
        _row(["**MiB per 1,000 subscribers**"] + [f"**{v:.1f}**" for v in memory["mib_per_1000"]]),
        _row(
            ["RSS after the live phase (MiB)"] + [f"{v:.1f}" for v in memory["rss_after_live_mib"]]
        ),
        _row(
            ["peak RSS during the live phase (MiB)"]
            + [f"{v:.1f}" for v in memory["peak_during_live_mib"]]
        ),
    ]
    for entry in memory["track"]:
        lines.append(_row([f"RSS {entry['when']} (MiB)"] + [f"{v:.1f}" for v in entry["rss_mib"]]))
    connect = memory["connect_one_ms"]
    lines += [
        "",
        f"Connecting and subscribing all of them ({CONNECTING} at a time) took "
        f"{memory['connect_all_s']:.1f} s; one connect + subscribe: p50 {_ms(connect['p50'])} ms, "
        f"p99 {_ms(connect['p99'])} ms.",
        "",
        "## HTTP with and without subscribers",
        "",
        f"Process A at saturation ({http['tool']}, {settings['connections']} keep-alive "
        f"connections, {settings['http_duration']:.0f} s per measurement): `purchase.get` of a "
        f"buyer with {GET_USER_PURCHASES:,} purchases, and `purchase.fulfill` by the payment "
        "backend of pending purchases of a buyer no one subscribes to (each event still goes "
        "through both processes' live machinery). Without subscribers, then with "
        f"{settings['subscribers']:,} connected and idle ({settings['subscribers'] // 2:,} on "
        "A), in alternating order round after round (each round connects a fresh set). "
        "Throughput ratio: with ÷ without, per round (the bold one is the median). CPU per "
        "call: the process's CPU time (all its threads) during the measurement over the calls "
        "answered, medians; its ratio, without ÷ with per round, is the steadier figure on a "
        "shared machine (another process takes wall-clock time from a server, not the CPU it "
        "spends per call). Above 1: no slower with subscribers.",
        "",
        _row(
            [
                "workload",
                "req/s without / with",
                "ratio",
                "per round",
                "A's CPU µs/call without / with",
                "CPU ratio",
                "B's CPU µs per A's call without / with",
                "p50 ms without / with",
                "p99 ms without / with",
                "errors",
            ]
        ),
        _row(["---"] + ["---:"] * 9),
    ]
    for workload, row in http_summary(http["runs"]).items():
        lines.append(
            _row(
                [
                    f"purchase.{workload}",
                    f"{row['rps'][0]:,.0f} / {row['rps'][1]:,.0f}",
                    f"**{row['ratio']:.2f}**",
                    ", ".join(f"{r:.2f}" for r in row["ratios"]),
                    f"{row['cpu_a'][0]:,.0f} / {row['cpu_a'][1]:,.0f}",
                    f"**{row['cpu_ratio']:.2f}**",
                    f"{row['cpu_b'][0]:,.0f} / {row['cpu_b'][1]:,.0f}",
                    f"{row['p50'][0]:.2f} / {row['p50'][1]:.2f}",
                    f"{row['p99'][0]:.2f} / {row['p99'][1]:.2f}",
                    row["errors"],
                ]
            )
        )
    lines += [
        "",
        f"Frames the idle subscribers received during these rounds: {http['idle_frames']} "
        f"(expected 0); sockets the server closed: {http['idle_dropped']}.",
        "",
    ]
    if data["notes"]:
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    own_workdir = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rpc-live-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Each subscriber is a socket here; the servers inherit the limit too.
    raise_file_limit(4 * args.subscribers + 1024)
    log(f"work directory {args.workdir}; load average {load_average():.2f}")
    bench = LiveBench(args)
    started = time.monotonic()
    try:
        await bench.run()
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    bench.record["wall_s"] = time.monotonic() - started
    return bench.record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    defaults = parse_args([])
    default_run = all(getattr(args, k) == getattr(defaults, k) for k in MEASURING)
    output: Path = args.output or (DEFAULT_OUTPUT if default_run else PARTIAL_OUTPUT)
    record = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    text = render(record)
    output.write_text(text)
    log("\n" + text)
    log(f"report written to {output} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
