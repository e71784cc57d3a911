"""Mailers: how a built message leaves. SMTP with aiosmtplib, or ``.eml`` files.

``mailer_for(settings)`` picks SMTP when ``RPC_SERVER_SMTP_URL`` is set and the file
mailer (into ``RPC_SERVER_MAIL_DIR``) otherwise. A mailer raises ``PermanentMailError``
when retrying cannot help (the recipient was refused) and ``TemporaryMailError`` when it
can (the server is down, busy, or answered 4xx; or an operator's fix is needed).

SMTP is encrypted whenever it can be: ``smtp://`` upgrades with STARTTLS when the server
offers it (aiosmtplib's own default), verifying the server's certificate; credentials
are never sent over a connection that is not encrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import ssl
import tempfile
import time
from dataclasses import dataclass, field, replace
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.policy import Compat32
from email.utils import getaddresses
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from rpc_server.private_files import make_private, make_private_directory

URL_FORM = "smtp://[user:pass@]host[:port][?starttls=1|0][&cafile=PATH] or smtps://…"
_YES = ("1", "true", "yes")
_NO = ("0", "false", "no")
NO_STARTTLS = "the SMTP server offers no STARTTLS, which ?starttls=1 requires"
NO_TLS_FOR_CREDENTIALS = (
    "the SMTP server offers no STARTTLS, and credentials are never sent without TLS: "
    "use a server that offers STARTTLS, or smtps://"
)


class MailError(Exception):
    """Sending failed; the message is safe to log (no credentials)."""


class TemporaryMailError(MailError):
    """Try again later."""


class PermanentMailError(MailError):
    """Retrying cannot help; the message is marked dead."""


def mailer_for(smtp_url: str | None, mail_dir: str, *, keep_open: int | None = None) -> Mailer:
    """SMTP when a URL is configured, else ``.eml`` files in ``mail_dir``. ``keep_open``:
    SMTP connections kept open between messages (the deliverer's sends at once, so
    that each of them finds one; None: ``SmtpMailer``'s default)."""
    if smtp_url:
        mailer = SmtpMailer.from_url(smtp_url)
        return mailer if keep_open is None else replace(mailer, max_idle=keep_open)
    return FileMailer(Path(mail_dir))


class Mailer(Protocol):
    async def send(self, message: Message) -> None:
        """Hand the message over; return only once it has been accepted. Several sends
        may run at the same time."""
        ...

    async def close(self) -> None:
        """Let go of what is kept between sends (open connections); sending again later
        is allowed."""
        ...


def _flag(query: dict[str, list[str]], name: str) -> bool | None:
    """A yes/no query parameter; None when absent. Raises ValueError otherwise."""
    if name not in query:
        return None
    value = query[name][-1].lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise ValueError(f"RPC_SERVER_SMTP_URL: ?{name}= takes 1 or 0, not {value!r}")


@dataclass(frozen=True)
class SmtpMailer:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    use_tls: bool = False
    # STARTTLS: None upgrades when the server offers it (the default), True requires it,
    # False never tries (plain text, allowed only without credentials).
    start_tls: bool | None = None
    # CA certificates (PEM) trusted besides the system's, for a server whose certificate
    # a private CA signed.
    cafile: str | None = None
    timeout: float = 30.0
    # Connections kept open after a message, for the next ones (at most this many, each
    # for at most ``idle_seconds``): a receipt then costs MAIL/RCPT/DATA, not a new TCP
    # connection, greeting, STARTTLS and login.
    max_idle: int = 8
    idle_seconds: float = 30.0
    _idle: list[tuple[aiosmtplib.SMTP, float]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    @classmethod
    def from_url(cls, url: str) -> SmtpMailer:
        """Parse ``URL_FORM``. Raises ValueError, saying what is wrong, for a URL that is
        malformed or that would send credentials in plain text (``?starttls=0``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"RPC_SERVER_SMTP_URL must look like {URL_FORM}")
        query = parse_qs(parts.query, keep_blank_values=True)
        implicit_tls = parts.scheme == "smtps"
        start_tls = _flag(query, "starttls")
        if implicit_tls and start_tls is not None:
            raise ValueError("RPC_SERVER_SMTP_URL: smtps:// is already TLS; drop ?starttls=")
        username = unquote(parts.username) if parts.username else None
        if username is not None and start_tls is False:
            raise ValueError(
                "RPC_SERVER_SMTP_URL: credentials are never sent without TLS; "
                "drop ?starttls=0 or the user and password"
            )
        cafile = query.get("cafile", [""])[-1] or None
        if cafile is not None and not os.path.isfile(cafile):
            raise ValueError(f"RPC_SERVER_SMTP_URL: ?cafile= names no file: {cafile}")
        return cls(
            hostname=parts.hostname,
            port=parts.port or (465 if implicit_tls else 25),
            username=username,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit_tls,
            start_tls=start_tls,
            cafile=cafile,
        )

    async def send(self, message: Message) -> None:
        reused = self._take_idle()
        if reused is not None:
            try:
                await _transmit(reused, message)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                reused.close()  # it timed out while idle: the message goes on a new one
            except BaseException as exc:
                reused.close()
                raise _mail_error(exc) from None
            else:
                self._keep(reused)
                return
        # Not aiosmtplib.send(): on cancellation its context manager still sends QUIT
        # and waits for the answer, so a hung server would hold a shutdown. Here the
        # connection is dropped at once when the send is cancelled.
        # Neither the credentials nor start_tls=True go to the client: it would log in
        # on connect whether or not the connection is encrypted. It upgrades when the
        # server offers STARTTLS; what the connection must be is checked here.
        client = aiosmtplib.SMTP(
            hostname=self.hostname,
            port=self.port,
            use_tls=self.use_tls,
            start_tls=False if self.start_tls is False else None,
            cert_bundle=self.cafile,
            timeout=self.timeout,
        )
        try:
            await client.connect()
            encrypted = client.get_transport_info("sslcontext") is not None
            if self.start_tls and not encrypted:
                raise TemporaryMailError(NO_STARTTLS)
            if self.username is not None:
                if not encrypted:
                    raise TemporaryMailError(NO_TLS_FOR_CREDENTIALS)
                await client.login(self.username, self.password or "")
            await _transmit(client, message)
        except BaseException as exc:
            client.close()
            raise _mail_error(exc) from None
        self._keep(client)

    async def close(self) -> None:
        idle, self._idle[:] = list(self._idle), []
        for client, _ in idle:
            await _quit(client)

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        """The most recently used open connection; older or dropped ones are closed."""
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < self.idle_seconds:
                return client
            client.close()
        return None

    def _keep(self, client: aiosmtplib.SMTP) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append((client, time.monotonic()))
        else:
            client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    """Say goodbye (briefly), then drop the connection whatever the answer."""
    try:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit(timeout=2.0)
    finally:
        client.close()


async def _transmit(client: aiosmtplib.SMTP, message: Message) -> None:
    """``client.send_message(message)``, the same bytes and envelope.

    aiosmtplib writes a ``compat32`` message out with ``email.policy.compat32`` whatever
    the message's own policy, folding every header through ``email.header``: about
    100 µs of the event loop per receipt. A ``compat32`` message with a plain envelope
    (``_plain_envelope``) is written here as aiosmtplib writes it, but with its own
    policy (the receipt's writes the same bytes, faster: ``rpc_server.mail.receipts``),
    and handed to ``sendmail``; anything else goes through ``send_message``.
    ``tests/integration/test_outbox_smtp.py`` checks both deliver the same.
    """
    envelope = _plain_envelope(message)
    if envelope is None:
        await client.send_message(message)
        return
    with io.BytesIO() as buffer:
        BytesGenerator(buffer, policy=message.policy).flatten(message)
        data = buffer.getvalue()
    if not data.isascii():  # 8bit text: written per the server's extensions there
        await client.send_message(message)
        return
    if client.is_ehlo_or_helo_needed:  # as send_message greets before it looks
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()
    options = ["BODY=8BITMIME"] if client.supports_extension("8BITMIME") else []
    sender, recipients = envelope
    await client.sendmail(sender, recipients, data, mail_options=options)


# Headers that change whom ``send_message`` takes the envelope from, or what it leaves
# out of the message: such a message is left to it.
_ENVELOPE_HEADERS = ("Sender", "Bcc", "Resent-Date", "Resent-From", "Resent-Sender", "Resent-Bcc")


def _plain_envelope(message: Message) -> tuple[str, list[str]] | None:
    """The sender (From) and recipients (To, Cc) that ``send_message`` would take from a
    ``compat32`` message, when all are ASCII; else None."""
    if isinstance(message, EmailMessage) or not isinstance(message.policy, Compat32):
        return None
    if any(name in message for name in _ENVELOPE_HEADERS):
        return None
    senders = message.get_all("From", [])
    if len(senders) != 1 or not all(isinstance(value, str) for value in senders):
        return None
    sender = [address for _, address in getaddresses(senders)]
    headers = [*message.get_all("To", []), *message.get_all("Cc", [])]
    if not all(isinstance(value, str) for value in headers):
        return None
    recipients = [address for _, address in getaddresses(headers)]
    if len(sender) != 1 or not sender[0] or not recipients or not all(recipients):
        return None
    if not (sender[0].isascii() and all(address.isascii() for address in recipients)):
        return None
    return sender[0], recipients


def _mail_error(exc: BaseException) -> BaseException:
    """What a failed send raises: ``MailError``s as they are, SMTP and network errors
    as permanent or temporary ``MailError``s, anything else (a cancellation) as it is."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        answers = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        permanent = all(r.code >= 500 for r in exc.recipients)
        error = PermanentMailError if permanent else TemporaryMailError
        return error(f"recipient refused: {answers}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        error = PermanentMailError if exc.code >= 500 else TemporaryMailError
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            # Wrong credentials are an operator's fix away: keep retrying meanwhile.
            error = TemporaryMailError
        return error(f"SMTP server answered {exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        # A failed TLS handshake is raised as it is after STARTTLS, and as the cause of
        # a connection error with smtps://.
        tls = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
        if isinstance(tls, ssl.SSLError):
            return TemporaryMailError(_tls_failed(tls))
        return TemporaryMailError(f"SMTP server unreachable: {type(exc).__name__}")
    return exc


def _tls_failed(error: ssl.SSLError) -> str:
    reason = getattr(error, "verify_message", None) or error.reason or type(error).__name__
    return (
        f"TLS with the SMTP server failed ({reason}): trust its CA with ?cafile=PATH, "
        "or (only without credentials) send in plain text with ?starttls=0"
    )


@dataclass
class FileMailer:
    """Writes each message to ``<directory>/<message id>.eml``: the embedded default.

    The files are written on a worker thread (the disk may stall), and the sends that
    arrive while a write is under way go together, one hop to the thread for the lot:
    one hop per message, with the deliverer's sends in flight at once, cost more CPU
    than the writes (thread wake-ups and the interpreter lock passed back and forth,
    measured in ``tests/benchmarks/profile.md``). Each send still returns once its own
    file is in place, or raises its own error.
    """

    directory: Path
    _waiting: list[tuple[Message, asyncio.Future[None]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _writer: asyncio.Task[None] | None = field(default=None, init=False, repr=False, compare=False)

    async def send(self, message: Message) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await written

    async def close(self) -> None:
        """Nothing is kept between messages; a write under way is let finish."""
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_waiting(self) -> None:
        batch: list[tuple[Message, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                # A send cancelled while it waited is not written.
                batch = [entry for entry in self._waiting if not entry[1].done()]
                self._waiting.clear()
                if not batch:
                    continue
                outcomes = await asyncio.to_thread(self._write_all, [m for m, _ in batch])
                for (_, written), outcome in zip(batch, outcomes, strict=True):
                    if written.done():
                        continue
                    if outcome is None:
                        written.set_result(None)
                    else:
                        written.set_exception(outcome)
                batch = []
        finally:
            # Interrupted (the loop is closing): no send is left waiting for ever.
            for _, written in [*batch, *self._waiting]:
                if not written.done():
                    written.set_exception(TemporaryMailError("the write was interrupted"))
            self._waiting.clear()

    def _write_all(self, messages: list[Message]) -> list[BaseException | None]:
        """Each message written, or the error that stopped it (one message's failure
        is its own)."""
        outcomes: list[BaseException | None] = []
        for message in messages:
            try:
                self._write(message)
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    def _write(self, message: Message) -> None:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(message["Message-ID"]).strip("<>"))
        data = message.as_bytes()
        try:
            # Write then rename: a reader never sees half a message, and a resend of
            # the same receipt replaces the file instead of adding one.
            try:
                descriptor, temporary = tempfile.mkstemp(suffix=".tmp", dir=self.directory)
            except FileNotFoundError:  # the first message, or the directory was removed
                # Receipts hold names, addresses and purchases: the server's user's alone
                # (a directory it creates is 0700, every file 0600, whatever the umask).
                make_private_directory(self.directory)
                descriptor, temporary = tempfile.mkstemp(suffix=".tmp", dir=self.directory)
            try:
                with open(descriptor, "wb") as handle:
                    make_private(handle.fileno())
                    handle.write(data)
                os.replace(temporary, self.directory / f"{name}.eml")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as exc:
            raise TemporaryMailError(f"cannot write to {self.directory}: {exc.strerror}") from None
