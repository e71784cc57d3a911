"""Helpers of the receipt-outbox tests: a real SMTP server, and a look into the outbox.

``SmtpServer`` is aiosmtpd on 127.0.0.1 in its own thread. It records every accepted
message (envelope and parsed ``EmailMessage``), can refuse chosen recipients with
``550 5.1.1`` at RCPT, can answer DATA with a ``451`` temporary failure a given number
of times, can offer STARTTLS with a certificate of a CA made for the test
(``LocalCa``, with trustme), can offer AUTH (PLAIN/LOGIN) for one login (without TLS
too, unless it offers STARTTLS: this is a test) and records every AUTH it is sent and
whether the connection was encrypted, and can be stopped and started again on the same
port, to play a mail server that goes down and comes back.

``outbox_rows`` reads the ``receipt_outbox`` table as it is (claim token included);
``fulfilled_purchase`` makes a receipt the way a paid fulfillment does (``more_courses``
gives a buyer more to buy); ``eventually`` polls;
``assert_is_receipt`` checks a received or written receipt.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from models import ReceiptOutbox
from rpc_server.config import Settings
from rpc_server.db.repositories.rows import as_utc
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.records import Actor
from rpc_server.mail.receipts import message_id_for
from tests.integration.paying import pay_and_fulfil

T = TypeVar("T")

HOST = "127.0.0.1"
REJECT_RECIPIENT = "550 5.1.1 no such user"
DATA_TEMPORARY_FAILURE = "451 4.3.0 temporary failure, try again later"


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    # Who authenticated on the connection that delivered it (None: no AUTH).
    login: str | None
    # Whether the connection that delivered it was encrypted (STARTTLS).
    encrypted: bool = False
    # The DATA as it arrived, and the MAIL FROM options (BODY=8BITMIME, SMTPUTF8).
    content: bytes = field(default=b"", repr=False)
    mail_options: tuple[str, ...] = ()


class RecordingHandler:
    """aiosmtpd handler hooks; they run in the server's thread, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._rcpt_attempts: list[str] = []
        self._rejected: set[str] = set()
        self._data_failures = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            self._rcpt_attempts.append(address)
            if address in self._rejected:
                return REJECT_RECIPIENT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            if self._data_failures > 0:
                self._data_failures -= 1
                return DATA_TEMPORARY_FAILURE
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        auth = session.auth_data if session.authenticated else None
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        received = Received(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            message,
            login,
            session.ssl is not None,
            content=envelope.original_content,
            mail_options=tuple(envelope.mail_options),
        )
        with self._lock:
            self._received.append(received)
        return "250 2.0.0 OK: queued"

    def reject(self, address: str) -> None:
        with self._lock:
            self._rejected.add(address)

    def accept(self, address: str) -> None:
        with self._lock:
            self._rejected.discard(address)

    def fail_data(self, times: int) -> None:
        with self._lock:
            self._data_failures = times

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def rcpt_attempts(self) -> list[str]:
        with self._lock:
            return list(self._rcpt_attempts)


@dataclass(frozen=True)
class LocalCa:
    """A certificate authority made for one test, and a certificate it issued for HOST."""

    # The CA's certificate (PEM), for a client's ?cafile=.
    ca_file: Path
    # A server-side context presenting the issued certificate.
    server_context: ssl.SSLContext

    @classmethod
    def create(cls, directory: Path) -> LocalCa:
        authority = trustme.CA()
        ca_file = directory / "test-ca.pem"
        authority.cert_pem.write_to_path(str(ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert(HOST, "smtp.test").configure_cert(context)
        return cls(ca_file=ca_file, server_context=context)


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH command the server was sent (and its authenticator saw)."""

    login: str | None
    encrypted: bool


class SmtpServer:
    """An aiosmtpd server on a fixed local port; ``stop()`` and ``start()`` at will.

    With ``tls``, it offers STARTTLS with that certificate, and AUTH only after it.
    What it recorded (and whom it rejects) survives a restart: the handler is kept.
    """

    def __init__(
        self,
        port: int | None = None,
        credentials: tuple[str, str] | None = None,
        tls: LocalCa | None = None,
    ):
        self.port = port or free_port()
        self.credentials = credentials
        self.tls = tls
        self.handler = RecordingHandler()
        self._controller: Controller | None = None
        self._lock = threading.Lock()
        self._auth_attempts: list[AuthAttempt] = []

    @property
    def url(self) -> str:
        return f"smtp://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        assert self._controller is None, "already running"
        # A fresh Controller each time: a stopped one has closed its event loop.
        # server_hostname spares a (possibly slow) socket.getfqdn() per connection.
        options: dict[str, Any] = {}
        if self.credentials is not None:
            # Without TLS, AUTH is offered in plain text (but not required: requiring it
            # without TLS makes aiosmtpd warn, and warnings are errors here).
            options = {"authenticator": self._authenticate, "auth_require_tls": False}
        if self.tls is not None:
            options |= {"tls_context": self.tls.server_context, "auth_require_tls": True}
        controller = Controller(
            self.handler, hostname=HOST, port=self.port, server_hostname="smtp.test",
            ready_timeout=10.0, **options,
        )  # fmt: skip
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        given = (
            (auth_data.login.decode(), auth_data.password.decode())
            if isinstance(auth_data, LoginPassword)
            else None
        )
        with self._lock:
            attempt = AuthAttempt(given[0] if given else None, session.ssl is not None)
            self._auth_attempts.append(attempt)
        if given != self.credentials:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, handled=False, auth_data=auth_data)

    def reject(self, address: str) -> None:
        """Answer ``RCPT TO:<address>`` with 550 5.1.1 from now on."""
        self.handler.reject(address)

    def accept(self, address: str) -> None:
        self.handler.accept(address)

    def fail_data(self, times: int) -> None:
        """Answer the next ``times`` DATA commands with a 451 temporary failure."""
        self.handler.fail_data(times)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def rcpt_attempts(self) -> list[str]:
        return self.handler.rcpt_attempts

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        """Every AUTH command it was sent, in order."""
        with self._lock:
            return list(self._auth_attempts)

    async def wait_for(self, count: int, within: float = 5.0) -> list[Received]:
        """Wait (without blocking the event loop) until ``count`` messages arrived."""
        deadline = time.monotonic() + within
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(received)} message(s) arrived, expected {count}")
            await asyncio.sleep(0.02)
        return received


# --- the outbox ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxRow:
    """One ``receipt_outbox`` row, read directly (the claim token included)."""

    outbox_id: int
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    claim_token: str | None
    sent_at: datetime | None


async def outbox_rows(engine: AsyncEngine) -> list[OutboxRow]:
    """Every outbox row, oldest first."""
    table = ReceiptOutbox
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(
                table.id, table.status, table.attempts, table.next_attempt_at,
                table.last_error, table.claim_token, table.sent_at,
            ).order_by(table.id)
        )  # fmt: skip
        return [
            OutboxRow(
                outbox_id=row.id,
                status=row.status,
                attempts=row.attempts,
                next_attempt_at=as_utc(row.next_attempt_at),
                last_error=row.last_error,
                claim_token=row.claim_token,
                sent_at=None if row.sent_at is None else as_utc(row.sent_at),
            )
            for row in rows
        ]


async def only_row(engine: AsyncEngine) -> OutboxRow:
    rows = await outbox_rows(engine)
    assert len(rows) == 1, rows
    return rows[0]


async def fulfilled_purchase(
    uow_factory: SqlUnitOfWorkFactory, actor: Actor, course: str = "python-basics"
) -> str:
    """Create a purchase as the buyer ``actor`` and fulfil it with a signed proof of
    payment (which writes its receipt row); return its id."""
    purchase = await services.create_purchase(uow_factory, actor, course=course)
    await pay_and_fulfil(uow_factory, actor, purchase)
    return purchase.purchase_id


async def more_courses(uow_factory: SqlUnitOfWorkFactory, count: int) -> list[str]:
    """Save ``count`` more courses and return their slugs: a buyer registered for a
    course cannot buy it again, so a test needing many receipts of one buyer buys many
    courses."""
    slugs = [f"course-{n}" for n in range(count)]
    for n, slug in enumerate(slugs):
        await services.save_course(
            uow_factory, slug=slug, title=f"Course {n}", price=Decimal("10.00"), currency="USD"
        )
    return slugs


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, within: float = 5.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something other than None (or False); return it."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def assert_is_receipt(
    message: EmailMessage,
    *,
    settings: Settings,
    purchase_id: str,
    recipient: str,
    title: str,
    amount: str,
) -> None:
    """The receipt the issue describes: headers, and both alternatives saying it all."""
    assert message["From"] == settings.mail_from
    assert message["To"] == recipient
    assert message["Subject"] == f"Your receipt: {title}"
    assert message["Message-ID"] == message_id_for(purchase_id, settings.mail_from)
    assert message["Date"].datetime is not None
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    for kind in ("plain", "html"):
        body = message.get_body(preferencelist=(kind,))
        assert body is not None
        content = body.get_content()
        assert title in content, kind
        assert amount in content, kind
        assert purchase_id in content, kind
