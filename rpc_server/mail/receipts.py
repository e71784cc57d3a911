"""The receipt email: a MIME message with plain-text and HTML alternatives.

Its ``Message-ID`` is derived from the purchase alone, so every (re)send of one
purchase's receipt carries the same id and a receiver can drop duplicates.

The deliverer builds receipts on the server's own core, so a receipt must be cheap to
build and to write out. It is a ``compat32`` :class:`email.message.Message` holding text
that is already encoded: its headers (a non-ASCII or unfoldable Subject as RFC 2047
encoded words) and, as its payload, the whole ``multipart/alternative`` body: both parts
with their headers between the boundaries, a text as it is when it is 7bit data, else
quoted-printable. Built as an ``EmailMessage`` under ``email.policy.default`` (until
issue 17) a receipt cost over ten times the CPU: that policy parses every header it is
given, refolds each one at every serialization and encodes the parts through its content
manager. The parts are text rather than sub-messages because aiosmtplib writes a
``compat32`` message out with ``compat32``, which folds every header through
``email.header`` again. A receiver reads the same receipt either way: the same header
values and decoded texts (``tests/unit/test_receipts.py`` compares the two on generated
receipts, as ``as_bytes()`` writes them and as aiosmtplib sends them).

Two rare cases are still built as before, as an ``EmailMessage`` under
``email.policy.default``, because only that policy writes them unchanged: a recipient
that is not a plain ``local@domain`` of ASCII atoms (a quoted or commented local part,
an address literal, a non-ASCII domain, which needs SMTPUTF8), and a ``mail_from`` whose
From header is not exactly one ASCII address.
"""

from __future__ import annotations

import binascii
import functools
import html
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from email.charset import Charset
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.policy import Compat32
from email.policy import default as default_policy
from email.utils import format_datetime, getaddresses, parseaddr

# What ``str.splitlines`` breaks a line at: none of them may reach a header. (The email
# policy refuses a header value of several lines; one with a single line break at its
# end it let through, and the headers after it then fell into the body.)
_LINE_BREAK = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# A header line that does not start with white space is a header of its own.
_UNINDENTED_LINE = re.compile(r"\n(?![ \t])")
# A recipient written as it is, by both policies alike: a dot-atom of ASCII atext, "@",
# a dot-atom domain (RFC 5322 3.2.3). "=?" would start an encoded word.
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_PLAIN_ADDRESS = re.compile(f"{_ATOMS}@{_ATOMS}")
# A Subject of printable ASCII is written as it is (folded at its spaces when long); a
# longer word could not be folded, so such a Subject is encoded like a non-ASCII one.
_UNFOLDABLE_WORD = re.compile(r"\S{70}")
# An encoded word of 42 octets is at most 68 characters (base64, or shorter: "Q"), so
# "Subject: " and one word fit a line of 78 (RFC 5322 2.1.1, RFC 2047 2: 75 at most).
_WORD_OCTETS = 42
_UTF8 = Charset("utf-8")
# RFC 5322 2.1.1: no line of a message longer than 998 octets.
_MAX_LINE = 998
# The same in every receipt: a text holding it is quoted-printable, where "==" cannot
# appear ("=" starts "=XX" or ends a line), so no line of a part can be a boundary.
_BOUNDARY = "==receipt-alternative=="
_ALTERNATIVE = f'multipart/alternative; boundary="{_BOUNDARY}"'


class ReceiptPolicy(Compat32):
    """``compat32``, writing a header that fits on its line as ``Name: value``.

    ``compat32`` folds every header through ``email.header.Header``, which measures and
    splits the value a word at a time: four fifths of writing a receipt out (about
    100 µs of 120). A value of printable ASCII that fits in ``max_line_length`` comes
    out of that folder unchanged, so it is written as it is here; anything else (a
    longer value, encoded words on several lines, a ``Header``) still goes through
    ``Compat32``. ``tests/unit/test_receipts.py`` checks both write the same bytes.
    """

    def fold(self, name: str, value: str) -> str:
        if self._fits(name, value):
            return f"{name}: {value}{self.linesep}"
        return super().fold(name, value)

    def fold_binary(self, name: str, value: str) -> bytes:
        if self._fits(name, value):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)

    def _fits(self, name: str, value: str) -> bool:
        limit = self.max_line_length
        return (
            isinstance(value, str)  # not a Header
            and limit is not None
            and len(name) + 2 + len(value) <= limit
            and value.isascii()
            and value.isprintable()
        )


RECEIPT_POLICY = ReceiptPolicy()


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a receipt says: one fulfilled purchase."""

    purchase_id: str
    recipient: str
    course_title: str
    amount: Decimal
    currency: str
    fulfilled_at: datetime


def message_id_for(purchase_id: str, mail_from: str) -> str:
    """Return the stable Message-ID of a purchase's receipt."""
    return f"<receipt-{purchase_id}@{_message_id_domain(mail_from)}>"


@functools.lru_cache(maxsize=16)
def _message_id_domain(mail_from: str) -> str:
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    return domain if at and domain else "localhost"


def build_receipt(receipt: Receipt, *, mail_from: str) -> Message:
    """Return the receipt as a ready-to-send message.

    Raises ValueError when it cannot be written: a recipient the email library refuses,
    a course title or ``mail_from`` with a line break, a ``mail_from`` the email library
    cannot read or write (or whose domain, the Message-ID's, is not ASCII), or text that
    is not Unicode (a lone surrogate).
    """
    subject = f"Your receipt: {receipt.course_title}"
    message_id = message_id_for(receipt.purchase_id, mail_from)
    _refuse_line_breaks("Subject", subject)
    _refuse_line_breaks("Message-ID", message_id)
    if not message_id.isascii():  # from a mail_from such as "@é <shop@example.com>"
        raise ValueError(f"a Message-ID must be ASCII: {message_id!r}")
    plain, html_text = _texts(receipt)
    sender = _from_header(mail_from)
    if sender is None or not _is_plain_address(receipt.recipient):
        _check_recipient(receipt.recipient)
        return _build_with_email_policy(receipt, mail_from, subject, plain, html_text)
    message = Message(policy=RECEIPT_POLICY)
    message["Subject"] = _subject_header(subject)
    message["From"] = sender
    message["To"] = receipt.recipient
    message["Date"] = format_datetime(receipt.fulfilled_at)
    message["Message-ID"] = message_id  # folded onto a line of its own when too long
    message["MIME-Version"] = "1.0"
    message["Content-Type"] = _ALTERNATIVE
    message.set_payload(f"{_part('plain', plain)}\n{_part('html', html_text)}\n--{_BOUNDARY}--\n")
    return message


def _texts(receipt: Receipt) -> tuple[str, str]:
    """The plain text and the HTML, each ending with a line break."""
    amount = f"{receipt.amount:.2f} {receipt.currency}"
    when = receipt.fulfilled_at.strftime("%Y-%m-%d %H:%M UTC")
    plain = (
        "Thank you for your purchase.\n\n"
        f"Course:      {receipt.course_title}\n"
        f"Amount:      {amount}\n"
        f"Purchase id: {receipt.purchase_id}\n"
        f"Date:        {when}\n\n"
        "You are registered for the course and can start right away.\n"
    )
    e = html.escape
    html_text = (
        "<!doctype html><html><body>"
        "<p>Thank you for your purchase.</p>"
        "<table>"
        f"<tr><th align='left'>Course</th><td>{e(receipt.course_title)}</td></tr>"
        f"<tr><th align='left'>Amount</th><td>{e(amount)}</td></tr>"
        f"<tr><th align='left'>Purchase id</th><td>{e(receipt.purchase_id)}</td></tr>"
        f"<tr><th align='left'>Date</th><td>{e(when)}</td></tr>"
        "</table>"
        "<p>You are registered for the course and can start right away.</p>"
        "</body></html>\n"
    )
    return plain, html_text


def _refuse_line_breaks(name: str, value: str) -> None:
    if _LINE_BREAK.search(value):
        raise ValueError(f"a {name} header cannot hold a line break: {value!r}")


def _is_plain_address(address: str) -> bool:
    return _PLAIN_ADDRESS.fullmatch(address) is not None and "=?" not in address


def _check_recipient(address: str) -> None:
    """Raise ValueError unless the email library accepts ``address`` as an addr-spec."""
    try:
        Address(addr_spec=address)
    except ValueError:
        raise
    except Exception as exc:  # its parser also refuses with HeaderParseError, IndexError…
        raise ValueError(f"not an email address: {address!r}") from exc


@functools.lru_cache(maxsize=16)
def _from_header(mail_from: str) -> str | None:
    """The From header as the email policy writes it (display names encoded, folded),
    or None when a compat32 message cannot carry it unchanged: anything but one ASCII
    address, which aiosmtplib must read back from this text as the sender."""
    _refuse_line_breaks("From", mail_from)
    try:
        header = default_policy.header_factory("From", mail_from)
        folded = header.fold(policy=default_policy)
    except ValueError:
        raise
    except Exception as exc:  # its parser also refuses with HeaderParseError, IndexError…
        raise ValueError(f"not a From header: {mail_from!r}") from exc
    if _UNINDENTED_LINE.search(folded.removesuffix("\n")):  # its folder broke it in two
        raise ValueError(f"mail_from cannot be written as a From header: {mail_from!r}")
    value = folded.removeprefix("From:").strip(" \n")
    if header.defects or len(header.addresses) != 1 or not value.isascii():
        return None
    read_back = [address for _, address in getaddresses([value])]
    return value if read_back == [header.addresses[0].addr_spec] else None


def _subject_header(subject: str) -> str:
    """The Subject as it is when it is printable ASCII that folds, else as RFC 2047
    encoded words of at most ``_WORD_OCTETS`` of UTF-8 each, one per line, none
    splitting a character. (``email.header.Header`` writes the same, at three times
    the cost: it measures the words a character at a time.)

    Raises ValueError (UnicodeEncodeError) for text that is not Unicode."""
    if subject.isascii() and subject.isprintable() and not _UNFOLDABLE_WORD.search(subject):
        return subject
    data = subject.encode("utf-8")
    words = []
    start = 0
    while start < len(data):
        end = min(start + _WORD_OCTETS, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a character
            end -= 1
        words.append(_UTF8.header_encode(data[start:end].decode("utf-8")))
        start = end
    return "\n ".join(words)


def _part(subtype: str, text: str) -> str:
    """One part of the body, from its opening boundary to the end of its text: the
    text as it is when it is 7bit data (RFC 2045 2.7), else quoted-printable.

    Raises ValueError (UnicodeEncodeError) for text that is not Unicode."""
    data = text.encode("utf-8")
    if (
        data.isascii()
        and b"\0" not in data
        and b"\r" not in data
        and _BOUNDARY not in text
        and max(map(len, data.split(b"\n"))) <= _MAX_LINE
    ):
        encoding, body = "7bit", text
    else:
        encoding, body = "quoted-printable", binascii.b2a_qp(data).decode("ascii")
    return (
        f"--{_BOUNDARY}\n"
        f'Content-Type: text/{subtype}; charset="utf-8"\n'
        f"Content-Transfer-Encoding: {encoding}\n\n"
        f"{body}"
    )


def _build_with_email_policy(
    receipt: Receipt, mail_from: str, subject: str, plain: str, html_text: str
) -> EmailMessage:
    """The receipt under ``email.policy.default``, for the addresses only it writes as
    before (see the module's docstring)."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = mail_from
    message["To"] = Address(addr_spec=receipt.recipient)
    message["Date"] = format_datetime(receipt.fulfilled_at)
    message["Message-ID"] = message_id_for(receipt.purchase_id, mail_from)
    message.set_content(plain)
    message.add_alternative(html_text.removesuffix("\n"), subtype="html")
    return message
