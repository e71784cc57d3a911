"""Mailers: how a built message leaves. SMTP with aiosmtplib, or ``.eml`` files.

``mailer_for(settings)`` picks SMTP when ``RPC_SERVER_SMTP_URL`` is set and the file
mailer (into ``RPC_SERVER_MAIL_DIR``) otherwise. A mailer raises ``PermanentMailError``
when retrying cannot help (the recipient was refused) and ``TemporaryMailError`` when it
can (the server is down, busy, or answered 4xx).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib


class MailError(Exception):
    """Sending failed; the message is safe to log (no credentials)."""


class TemporaryMailError(MailError):
    """Try again later."""


class PermanentMailError(MailError):
    """Retrying cannot help; the message is marked dead."""


def mailer_for(smtp_url: str | None, mail_dir: str) -> Mailer:
    """SMTP when a URL is configured, else ``.eml`` files in ``mail_dir``."""
    if smtp_url:
        return SmtpMailer.from_url(smtp_url)
    return FileMailer(Path(mail_dir))


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Hand the message over; return only once it has been accepted."""
        ...


@dataclass(frozen=True)
class SmtpMailer:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    use_tls: bool = False
    start_tls: bool = False
    timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str) -> SmtpMailer:
        """``smtp://[user:pass@]host[:port][?starttls=1]`` or ``smtps://`` (implicit TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("RPC_SERVER_SMTP_URL must look like smtp://host:port or smtps://host")
        query = parse_qs(parts.query)
        implicit_tls = parts.scheme == "smtps"
        start_tls = query.get("starttls", ["0"])[0].lower() in ("1", "true", "yes")
        if implicit_tls and start_tls:
            raise ValueError("RPC_SERVER_SMTP_URL: smtps:// is already TLS; drop ?starttls=1")
        return cls(
            hostname=parts.hostname,
            port=parts.port or (465 if implicit_tls else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit_tls,
            start_tls=start_tls,
        )

    async def send(self, message: EmailMessage) -> None:
        # Not aiosmtplib.send(): on cancellation its context manager still sends QUIT
        # and waits for the answer, so a hung server would hold a shutdown. Here the
        # connection is dropped at once when the send is cancelled.
        client = aiosmtplib.SMTP(
            hostname=self.hostname,
            port=self.port,
            username=self.username,
            password=self.password,
            use_tls=self.use_tls,
            start_tls=self.start_tls,
            timeout=self.timeout,
        )
        try:
            await client.connect()
            await client.send_message(message)
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.quit()
        except aiosmtplib.SMTPRecipientsRefused as exc:
            answers = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            permanent = all(r.code >= 500 for r in exc.recipients)
            error = PermanentMailError if permanent else TemporaryMailError
            raise error(f"recipient refused: {answers}") from None
        except aiosmtplib.SMTPResponseException as exc:
            error = PermanentMailError if exc.code >= 500 else TemporaryMailError
            if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
                # Wrong credentials are an operator's fix away: keep retrying meanwhile.
                error = TemporaryMailError
            raise error(f"SMTP server answered {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporaryMailError(f"SMTP server unreachable: {type(exc).__name__}") from None
        finally:
            client.close()


@dataclass(frozen=True)
class FileMailer:
    """Writes each message to ``<directory>/<message id>.eml``: the embedded default."""

    directory: Path

    async def send(self, message: EmailMessage) -> None:
        await asyncio.to_thread(self._write, message)

    def _write(self, message: EmailMessage) -> None:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(message["Message-ID"]).strip("<>"))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a message, and a resend of
            # the same receipt replaces the file instead of adding one.
            with tempfile.NamedTemporaryFile(
                "wb", dir=self.directory, suffix=".tmp", delete=False
            ) as handle:
                handle.write(message.as_bytes())
            # Readable by a mail pickup process running as another user.
            os.chmod(handle.name, 0o644)
            os.replace(handle.name, self.directory / f"{name}.eml")
        except OSError as exc:
            raise TemporaryMailError(f"cannot write to {self.directory}: {exc.strerror}") from None
