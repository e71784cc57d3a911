"""Helpers of the reliability tests: real server processes, a recording load, whole-database checks.

- ``ServerProcess``: ``rpc-server serve`` as a real process (output to a log file, so a
  busy server never blocks on a full pipe), started and waited for without blocking the
  event loop (a ``TcpProxy`` in the same loop may carry its database connections), and
  stopped by SIGTERM (``stop``) or SIGKILL (``kill``). ``rss_kib`` reads its VmRSS.
- ``RpcLoad``: an aiohttp client that records every exchange (when it started, when its
  request was written, when it ended, the HTTP status, the body, the transport error)
  and checks each answer against JSON-RPC 2.0 (``response_problems``).
- ``mail_server``: the tests' aiosmtpd ``SmtpServer`` with a handler that can hold DATA
  for a while and stamps every accepted message with its Message-ID and times.
- ``database_snapshot``: purchases, registrations, outbox rows and audit events read with
  SQL over the whole database, with the violations of the exactly-once invariants found
  in them.
- ``paid_fulfil``: the params of a buyer's ``purchase.fulfill`` with a signed proof of
  payment (the server processes verify it with ``tests.payments.TEST_PAYMENT_KEY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import itertools
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.config import Settings
from rpc_server.mail.receipts import message_id_for
from tests.integration.smtp_server import RecordingHandler, SmtpServer
from tests.payments import TEST_PAYMENT_KEY, proof_for
from tests.processes import RPC_SERVER, free_port

MAIL_FROM = Settings().mail_from
SERVER_ERRORS = range(500, 600)


def receipt_message_id(purchase_id: str) -> str:
    """The Message-ID the server gives the receipt of ``purchase_id``."""
    return message_id_for(purchase_id, MAIL_FROM)


def paid_fulfil(purchase: dict[str, Any], **proof: Any) -> dict[str, Any]:
    """Params of ``purchase.fulfill`` (fulfilled) for ``purchase`` (as serialized, or at
    least its purchase_id, amount and currency), with a fresh signed proof of payment:
    what a buyer sends once the payment step succeeded."""
    return {
        "purchase_id": purchase["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(purchase, **proof),
    }


async def add_courses(engine: AsyncEngine, prefix: str, count: int) -> list[str]:
    """``count`` courses (10.00 USD) named ``{prefix}-{n}``, inserted with one statement;
    returns their slugs. A buyer registered for a course cannot buy it again, so a load
    that keeps buying and fulfilling needs a course per purchase."""
    slugs = [f"{prefix}-{n}" for n in range(count)]
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO courses (slug, title, price, currency) "
                "VALUES (:slug, :slug, 10.00, 'USD')"
            ),
            [{"slug": slug} for slug in slugs],
        )
    return slugs


def server_env(
    database_url: str, tmp_path: Path, *, smtp_url: str | None = None, **settings: object
) -> dict[str, str]:
    """Environment of a server process: fast mail retries, no rate limit, payment proofs
    signed with ``TEST_PAYMENT_KEY`` verified, then ``settings``.

    ``settings`` are named like ``Settings`` fields (``mail_lease=2`` sets
    ``RPC_SERVER_MAIL_LEASE=2``); ``None`` leaves a setting at its default.
    """
    values: dict[str, object] = {
        "database_url": database_url,
        "mail_dir": tmp_path / "mail",
        "mail_poll_interval": 0.1,
        "mail_retry_base": 0.1,
        "mail_retry_cap": 0.5,
        "mail_max_attempts": 1000,
        # The load comes from a few tokens, far faster than one frontend user.
        "rate_limit": 0,
        "anonymous_rate_limit": 0,
        # A few buyers make every purchase of the load: many open at once, by design.
        "max_pending_purchases": 1_000_000,
        "frontend_url": "https://shop.example",
        "payment_keys": TEST_PAYMENT_KEY,
    }
    if smtp_url is not None:
        values["smtp_url"] = smtp_url
    values.update(settings)
    return {
        f"RPC_SERVER_{name.upper()}": str(value)
        for name, value in values.items()
        if value is not None
    }


# --- server processes ------------------------------------------------------------------


class ServerProcess:
    """One ``rpc-server serve`` process on ``port`` (a free one unless given)."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *args: str, port: int | None = None
    ) -> None:
        self.env = dict(env)
        self.args = args
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Spawning does not block; only waiting would, and that is done by polling.
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [RPC_SERVER, "serve", "--port", str(self.port), *self.args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start(self, within: float = 30.0) -> None:
        """Start the process and wait until ``/healthz`` answers."""
        self.process = self._spawn()
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            return
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer in {within}s:\n{self.log()}")
                await asyncio.sleep(0.05)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the graceful shutdown."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, within: float = 60.0) -> int:
        """Wait (without blocking the loop) for the process to exit; return its status."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still running after {within}s:\n{self.tail()}")
            await asyncio.sleep(0.01)
        return code

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.running():
            self.terminate()
        return await self.wait(within)

    async def close(self) -> None:
        """Make sure the process is gone (SIGKILL if it still runs) and reaped."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.kill()
        await self.wait()

    def rss_kib(self) -> int:
        """The process's resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@contextlib.asynccontextmanager
async def started(server: ServerProcess) -> AsyncIterator[ServerProcess]:
    """Start ``server``; on the way out make sure it is gone, whatever happened."""
    try:
        await server.start()
        yield server
    finally:
        await server.close()


# --- the mail server -------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One message the SMTP server accepted: its Message-ID, and when DATA began and ended."""

    message_id: str
    data_started: float
    accepted: float


class TimedHandler(RecordingHandler):
    """Records every accepted message with times; ``delay`` holds each DATA that long."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self._timing_lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._in_data = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        started = time.monotonic()
        with self._timing_lock:
            self._in_data += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            answer = await super().handle_DATA(server, session, envelope)
        finally:
            with self._timing_lock:
                self._in_data -= 1
        if answer.startswith("250"):
            headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
                envelope.original_content
            )
            delivery = Delivery(str(headers["Message-ID"]), started, time.monotonic())
            with self._timing_lock:
                self._deliveries.append(delivery)
        return answer

    @property
    def deliveries(self) -> list[Delivery]:
        with self._timing_lock:
            return list(self._deliveries)

    @property
    def in_data(self) -> int:
        """How many messages are in DATA right now (held by ``delay``)."""
        with self._timing_lock:
            return self._in_data

    def message_ids(self) -> Counter[str]:
        return Counter(delivery.message_id for delivery in self.deliveries)


@contextlib.contextmanager
def mail_server(delay: float = 0.0) -> Iterator[tuple[SmtpServer, TimedHandler]]:
    """A real SMTP server on a free port; its handler holds each DATA ``delay`` seconds."""
    smtp = SmtpServer()
    handler = TimedHandler(delay)
    smtp.handler = handler
    smtp.start()
    try:
        yield smtp, handler
    finally:
        smtp.stop()


# --- the load --------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP request to ``/rpc`` and what became of it (times are ``time.monotonic``)."""

    payload: Any
    started: float
    # When the request headers were written to the connection (None: never).
    sent: float | None = None
    finished: float = 0.0
    status: int | None = None
    body: Any = None
    # A transport failure: the exception's class name.
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def refused(self) -> bool:
        """No connection could be made: the request never reached the server."""
        return self.error == "ClientConnectorError"

    @property
    def cut(self) -> bool:
        """The request was written but no answer came (reset, disconnected, timed out)."""
        return self.error is not None and not self.refused and self.sent is not None

    def answers(self) -> list[dict[str, Any]]:
        """The JSON-RPC answer objects in the body (one, or a batch's)."""
        if isinstance(self.body, dict):
            return [self.body]
        if isinstance(self.body, list):
            return [item for item in self.body if isinstance(item, dict)]
        return []

    def error_codes(self) -> list[int]:
        return [a["error"]["code"] for a in self.answers() if isinstance(a.get("error"), dict)]

    def result(self) -> Any:
        """The result of a single call (None if it has none)."""
        return self.body.get("result") if isinstance(self.body, dict) else None


def _answer_problems(answer: Any, expected_id: Any) -> list[str]:
    if not isinstance(answer, dict):
        return [f"answer is not an object: {answer!r:.200}"]
    problems = []
    if answer.get("jsonrpc") != "2.0":
        problems.append(f"jsonrpc member is {answer.get('jsonrpc')!r}")
    if unknown := set(answer) - {"jsonrpc", "id", "result", "error"}:
        problems.append(f"unknown members {sorted(unknown)}")
    if ("result" in answer) == ("error" in answer):
        problems.append("exactly one of result and error must be present")
    if "error" in answer:
        error = answer["error"]
        if not (
            isinstance(error, dict)
            and isinstance(error.get("code"), int)
            and not isinstance(error.get("code"), bool)
            and isinstance(error.get("message"), str)
            and set(error) <= {"code", "message", "data"}
        ):
            problems.append(f"malformed error object {error!r:.200}")
    if "id" not in answer:
        problems.append("id member missing")
    elif answer["id"] != expected_id:
        problems.append(f"id {answer['id']!r} answers a request with id {expected_id!r}")
    return problems


def response_problems(payload: Any, status: int, content_type: str, body: Any) -> list[str]:
    """What is wrong with ``body`` as the answer to ``payload`` (valid requests only)."""
    if status in SERVER_ERRORS:
        return [f"HTTP {status}"]
    requests = payload if isinstance(payload, list) else [payload]
    expected_ids = [r["id"] for r in requests if "id" in r]
    if not expected_ids:
        return [] if status == 204 else [f"HTTP {status} for notifications only (expected 204)"]
    if status != 200:
        return [f"HTTP {status}"]
    if content_type != "application/json":
        return [f"content type {content_type!r}"]
    if not isinstance(payload, list):
        return _answer_problems(body, payload["id"])
    if not isinstance(body, list):
        return [f"a batch answered with {type(body).__name__}"]
    answered_ids = [a.get("id") if isinstance(a, dict) else None for a in body]
    if sorted(map(repr, answered_ids)) != sorted(map(repr, expected_ids)):
        return [f"batch answers ids {answered_ids!r:.200}, expected {expected_ids!r:.200}"]
    return [p for answer in body for p in _answer_problems(answer, answer.get("id"))]


async def _on_headers_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    exchange = context.trace_request_ctx
    if isinstance(exchange, Exchange) and exchange.sent is None:
        exchange.sent = time.monotonic()


class RpcLoad:
    """A recording JSON-RPC client for load: ``async with RpcLoad(url) as load: ...``.

    ``force_close`` opens a new connection per request (so "a request that reached the
    server" and "a connection that was accepted" are the same thing).
    """

    def __init__(self, base_url: str, *, force_close: bool = False, timeout: float = 60.0):
        self.base_url = base_url
        self.force_close = force_close
        self.timeout = timeout
        self.exchanges: list[Exchange] = []
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RpcLoad:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_on_headers_sent)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=self.force_close),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            trace_configs=[trace],
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._session is not None
        await self._session.close()

    def request(self, method: str, params: Any = None, *, notify: bool = False) -> dict[str, Any]:
        """A request object with a fresh id (none for a notification)."""
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            request["params"] = params
        if not notify:
            request["id"] = next(self._ids)
        return request

    async def post(
        self, payload: Any, *, token: str | None = None, hold: asyncio.Event | None = None
    ) -> Exchange:
        """POST ``payload``; never raises for transport errors (they are recorded).

        With ``hold``, the headers and half the body go at once and the rest only when
        ``hold`` is set: a request that stays in flight as long as the test wants.
        """
        assert self._session is not None
        exchange = Exchange(payload=payload, started=time.monotonic())
        self.exchanges.append(exchange)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        raw = orjson.dumps(payload)

        async def in_two_parts() -> AsyncIterator[bytes]:
            assert hold is not None
            yield raw[: len(raw) // 2]
            await hold.wait()
            yield raw[len(raw) // 2 :]

        try:
            async with self._session.post(
                f"{self.base_url}/rpc",
                data=raw if hold is None else in_two_parts(),
                headers=headers,
                trace_request_ctx=exchange,
            ) as response:
                answer = await response.read()
                exchange.status = response.status
                content_type = response.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            exchange.error = type(exc).__name__
            exchange.finished = time.monotonic()
            return exchange
        exchange.finished = time.monotonic()
        if answer:
            try:
                exchange.body = orjson.loads(answer)
            except ValueError:
                exchange.problems.append(f"body is not JSON: {answer[:200]!r}")
                return exchange
        exchange.problems += response_problems(
            payload, exchange.status, content_type, exchange.body
        )
        return exchange

    async def call(self, method: str, params: Any = None, *, token: str | None = None) -> Exchange:
        return await self.post(self.request(method, params), token=token)

    # --- figures over what was recorded ---

    def answered(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.answered]

    def malformed(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.problems]

    def server_errors(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.status in SERVER_ERRORS]

    def code_counts(self) -> Counter[int]:
        return Counter(code for e in self.exchanges for code in e.error_codes())

    def calls(self) -> int:
        """JSON-RPC calls made (batch items counted one by one)."""
        return sum(len(e.payload) if isinstance(e.payload, list) else 1 for e in self.exchanges)


# --- the database ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxState:
    status: str
    attempts: int
    claim_token: str | None


@dataclass(frozen=True)
class DatabaseSnapshot:
    """What the whole database holds about purchases, registrations and receipts."""

    # purchase_id -> state
    purchases: dict[str, str]
    # purchase_id -> how many registrations / outbox rows
    registrations: Counter[str]
    outbox_rows: Counter[str]
    # purchase_id -> its outbox row
    outbox: dict[str, OutboxState]
    violations: list[str]
    # purchase_id -> the to_state of each of its audit events, oldest first
    events: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fulfilled(self) -> set[str]:
        return {pid for pid, state in self.purchases.items() if state == "fulfilled"}

    def states(self) -> Counter[str]:
        return Counter(self.purchases.values())

    def outbox_statuses(self) -> Counter[str]:
        return Counter(row.status for row in self.outbox.values())

    def claimed(self) -> set[str]:
        """Purchases whose receipt is claimed by a deliverer right now."""
        return {
            pid
            for pid, row in self.outbox.items()
            if row.status == "pending" and row.claim_token is not None
        }


async def database_snapshot(engine: AsyncEngine) -> DatabaseSnapshot:
    """Read the whole database and check the exactly-once invariants on it.

    Every fulfilled purchase has exactly one registration and one outbox row (for its
    buyer and course, to its buyer's address); no registration or outbox row belongs to
    a purchase that is not fulfilled (or does not exist). Every purchase's audit trail
    begins with its creation (pending) and each event starts from the state the one
    before it left, the last one in the purchase's state; the events' seq run 1, 2, 3 …
    without a gap up to ``event_sequence.last_seq`` (a change rolled back or cut by a
    crash took its seq back with it).
    """
    async with engine.connect() as connection:

        async def rows(sql: str) -> list[Any]:
            return list(await connection.execute(text(sql)))

        purchases = await rows(
            "SELECT p.purchase_id, p.state, p.fulfilled_at, u.email FROM purchases p "
            "JOIN users u ON u.id = p.owner_id"
        )
        registrations = await rows(
            "SELECT p.purchase_id, p.state, r.user_id = p.owner_id AS same_user, "
            "r.course_id = p.course_id AS same_course FROM course_registrations r "
            "LEFT JOIN purchases p ON p.id = r.purchase_id"
        )
        outbox = await rows(
            "SELECT p.purchase_id, p.state, o.status, o.attempts, o.claim_token, "
            "o.recipient = u.email AS to_buyer FROM receipt_outbox o "
            "LEFT JOIN purchases p ON p.id = o.purchase_id "
            "LEFT JOIN users u ON u.id = p.owner_id"
        )
        events = await rows(
            "SELECT e.seq, p.purchase_id, e.from_state, e.to_state FROM purchase_events e "
            "LEFT JOIN purchases p ON p.id = e.purchase_id ORDER BY e.seq"
        )
        [last_seq] = await rows("SELECT last_seq FROM event_sequence")
    violations: list[str] = []
    states = {row.purchase_id: row.state for row in purchases}
    registration_counts: Counter[str] = Counter()
    for row in registrations:
        if row.purchase_id is None:
            violations.append("a registration without a purchase")
            continue
        registration_counts[row.purchase_id] += 1
        if row.state != "fulfilled":
            violations.append(f"registration of {row.state} purchase {row.purchase_id}")
        if not (row.same_user and row.same_course):
            violations.append(f"registration of {row.purchase_id} for another user or course")
    outbox_counts: Counter[str] = Counter()
    outbox_states: dict[str, OutboxState] = {}
    for row in outbox:
        if row.purchase_id is None:
            violations.append("an outbox row without a purchase")
            continue
        outbox_counts[row.purchase_id] += 1
        outbox_states[row.purchase_id] = OutboxState(row.status, row.attempts, row.claim_token)
        if row.state != "fulfilled":
            violations.append(f"outbox row of {row.state} purchase {row.purchase_id}")
        if not row.to_buyer:
            violations.append(f"receipt of {row.purchase_id} not addressed to its buyer")
    for row in purchases:
        if row.state != "fulfilled":
            continue
        if row.fulfilled_at is None:
            violations.append(f"fulfilled purchase {row.purchase_id} without fulfilled_at")
        for what, counts in (("registrations", registration_counts), ("receipts", outbox_counts)):
            if counts[row.purchase_id] != 1:
                violations.append(f"{row.purchase_id}: {counts[row.purchase_id]} {what}")
    trails: dict[str, list[str]] = {}
    for row in events:
        if row.purchase_id is None:
            violations.append(f"event {row.seq} without a purchase")
            continue
        trail = trails.setdefault(row.purchase_id, [])
        before = trail[-1] if trail else None
        if row.from_state != before or (before is None and row.to_state != "pending"):
            violations.append(
                f"{row.purchase_id}: event {row.seq} {row.from_state}->{row.to_state} "
                f"after {before}"
            )
        trail.append(row.to_state)
    for purchase_id, state in states.items():
        if trails.get(purchase_id, [None])[-1] != state:
            violations.append(f"{purchase_id}: {state}, its events {trails.get(purchase_id)}")
    seqs = [row.seq for row in events]
    if seqs != list(range(1, len(seqs) + 1)) or last_seq.last_seq != len(seqs):
        violations.append(
            f"event seqs not 1..{len(seqs)} without gaps (last_seq {last_seq.last_seq})"
        )
    return DatabaseSnapshot(
        states, registration_counts, outbox_counts, outbox_states, violations, trails
    )


async def eventually_all_sent(engine: AsyncEngine, *, within: float = 30.0) -> DatabaseSnapshot:
    """Wait until every outbox row is sent; return the last snapshot either way."""
    deadline = time.monotonic() + within
    while True:
        snapshot = await database_snapshot(engine)
        if set(snapshot.outbox_statuses()) <= {"sent"} or time.monotonic() > deadline:
            return snapshot
        await asyncio.sleep(0.2)


def duplicates(message_ids: Counter[str]) -> dict[str, int]:
    return {message_id: n for message_id, n in message_ids.items() if n > 1}
