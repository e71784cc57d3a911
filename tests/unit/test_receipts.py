"""The receipt message: headers, both alternatives, escaping, a stable Message-ID.

And the compat32 builder against the ``email.policy.default`` builder it replaced (kept
below as ``reference_build_receipt``): on generated receipts a receiver reads the same
message from both (every header value, both decoded texts), and both refuse the same
receipts. (What aiosmtplib sends is checked end to end against a real SMTP server in
``tests/integration/test_outbox_smtp.py``, through its public ``send_message`` only.)
"""

from __future__ import annotations

import email
import email.policy
import html
import string
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.policy import compat32
from email.utils import format_datetime, formataddr, parseaddr

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rpc_server.mail.receipts import RECEIPT_POLICY, Receipt, build_receipt, message_id_for

MAIL_FROM = "Course Shop <receipts@shop.example>"
RECEIPT = Receipt(
    purchase_id="0123456789abcdef0123456789abcdef",
    recipient="alice@example.com",
    course_title="Python Basics",
    amount=Decimal("49"),
    currency="USD",
    fulfilled_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
)


def reparsed(message: Message) -> EmailMessage:
    """The message as a receiver reads it: serialized, then parsed back."""
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None, kind
    content = part.get_content()
    assert isinstance(content, str)
    return content


def test_headers() -> None:
    message = reparsed(build_receipt(RECEIPT, mail_from=MAIL_FROM))
    assert message["From"] == MAIL_FROM
    assert message["From"].addresses[0].addr_spec == "receipts@shop.example"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Your receipt: Python Basics"
    assert message["Date"].datetime == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert message["Message-ID"] == "<receipt-0123456789abcdef0123456789abcdef@shop.example>"
    assert message["MIME-Version"] == "1.0"


def test_plain_text_and_html_alternatives_say_it_all() -> None:
    message = reparsed(build_receipt(RECEIPT, mail_from=MAIL_FROM))
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    for kind in ("plain", "html"):
        content = body(message, kind)
        assert "Python Basics" in content, kind
        assert "49.00 USD" in content, kind  # two decimals, whatever the stored scale
        assert RECEIPT.purchase_id in content, kind
        assert "2024-05-06 07:08 UTC" in content, kind


def test_amount_keeps_cents_and_currency() -> None:
    receipt = replace(RECEIPT, amount=Decimal("39.5"), currency="EUR")
    message = reparsed(build_receipt(receipt, mail_from=MAIL_FROM))
    assert "39.50 EUR" in body(message, "plain")
    assert "39.50 EUR" in body(message, "html")


def test_course_title_is_escaped_in_html_only() -> None:
    title = "<script>alert('x')</script> & Friends"
    message = reparsed(build_receipt(replace(RECEIPT, course_title=title), mail_from=MAIL_FROM))
    html = body(message, "html")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Friends" in html
    assert title in body(message, "plain")
    assert message["Subject"] == f"Your receipt: {title}"


def test_non_ascii_title_and_sender_survive_the_round_trip() -> None:
    title = "Café für Anfänger — 入門"
    mail_from = "Kursladen Müller <quittung@shop.example>"
    message = reparsed(build_receipt(replace(RECEIPT, course_title=title), mail_from=mail_from))
    assert message["Subject"] == f"Your receipt: {title}"
    assert message["From"] == mail_from
    assert title in body(message, "plain") and title in body(message, "html")


def test_message_id_is_stable_per_purchase() -> None:
    first = build_receipt(RECEIPT, mail_from=MAIL_FROM)
    later = build_receipt(
        replace(RECEIPT, fulfilled_at=datetime(2030, 1, 1, tzinfo=UTC)), mail_from=MAIL_FROM
    )
    assert first["Message-ID"] == later["Message-ID"]
    assert first["Message-ID"] == message_id_for(RECEIPT.purchase_id, MAIL_FROM)
    other = build_receipt(replace(RECEIPT, purchase_id="f" * 32), mail_from=MAIL_FROM)
    assert other["Message-ID"] != first["Message-ID"]


def test_message_id_domain_comes_from_mail_from() -> None:
    assert (
        message_id_for("abc", "Course Shop <receipts@shop.example>") == "<receipt-abc@shop.example>"
    )
    assert message_id_for("abc", "billing@mail.example.org") == "<receipt-abc@mail.example.org>"
    assert message_id_for("abc", "") == "<receipt-abc@localhost>"


def test_message_id_falls_back_to_localhost_when_mail_from_has_no_domain() -> None:
    """BUG: ``parseaddr("receipts")[1].rpartition("@")[2]`` is "receipts" (rpartition puts
    the whole string last when there is no "@"), so the ``or "localhost"`` fallback only
    ever applies to an empty address and the local part becomes the Message-ID's domain.
    """
    assert message_id_for("abc", "receipts") == "<receipt-abc@localhost>"
    assert message_id_for("abc", "Course Shop <receipts>") == "<receipt-abc@localhost>"


# --- refusals ---------------------------------------------------------------------------

# What ``str.splitlines`` breaks a line at.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("line_break", [*LINE_BREAKS, "\r\n"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_title_with_a_line_break_is_refused(line_break: str, where: str) -> None:
    title = {"start": f"{line_break}Python", "middle": f"Py{line_break}thon"}.get(
        where, f"Python{line_break}"
    )
    with pytest.raises(ValueError, match="line break"):
        build_receipt(replace(RECEIPT, course_title=title), mail_from=MAIL_FROM)


def test_the_reference_let_a_trailing_line_break_through_and_broke_the_message() -> None:
    """Why a line break at the end of a title is refused now: the old builder took it,
    and the headers after the Subject fell into the body (no To, no From)."""
    old = reparsed(reference_build_receipt(replace(RECEIPT, course_title="Python\n"), MAIL_FROM))
    assert old["To"] is None and old["From"] is None


@pytest.mark.parametrize(
    "recipient",
    [
        "",  # the email library raised IndexError, not ValueError
        "alice@",  # IndexError
        "<alice@example.com>",  # HeaderParseError, not a ValueError either
        "@example.com",  # HeaderParseError
        "alice@example.",  # HeaderParseError
        "jörg@example.com",  # a non-ASCII local part
        "alice bob@example.com",
        "alice..bob@example.com",
        ".alice@example.com",
        "alice@example.com, bob@example.com",
        "Alice <alice@example.com>",
        "alice\x00@example.com",
        "alice@example.com\n",
    ],
)
def test_a_recipient_the_email_library_refuses_is_a_value_error(recipient: str) -> None:
    with pytest.raises((ValueError, IndexError, HeaderParseError)):
        reference_build_receipt(replace(RECEIPT, recipient=recipient), MAIL_FROM)
    with pytest.raises(ValueError):
        build_receipt(replace(RECEIPT, recipient=recipient), mail_from=MAIL_FROM)


def test_text_that_is_not_unicode_is_refused() -> None:
    with pytest.raises(ValueError):
        build_receipt(replace(RECEIPT, course_title="Python \ud800"), mail_from=MAIL_FROM)


# --- the reference ------------------------------------------------------------------------
# REFERENCE ONLY, for the comparisons below: ``build_receipt`` and ``message_id_for`` as
# rpc_server/mail/receipts.py had them before the compat32 builder (issue 17), verbatim
# but for their names. An EmailMessage under email.policy.default.


def reference_message_id_for(purchase_id: str, mail_from: str) -> str:
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    domain = domain if at and domain else "localhost"
    return f"<receipt-{purchase_id}@{domain}>"


def reference_build_receipt(receipt: Receipt, mail_from: str) -> EmailMessage:
    amount = f"{receipt.amount:.2f} {receipt.currency}"
    when = receipt.fulfilled_at.strftime("%Y-%m-%d %H:%M UTC")
    message = EmailMessage()
    message["Subject"] = f"Your receipt: {receipt.course_title}"
    message["From"] = mail_from
    message["To"] = Address(addr_spec=receipt.recipient)
    message["Date"] = format_datetime(receipt.fulfilled_at)
    message["Message-ID"] = reference_message_id_for(receipt.purchase_id, mail_from)
    message.set_content(
        "Thank you for your purchase.\n\n"
        f"Course:      {receipt.course_title}\n"
        f"Amount:      {amount}\n"
        f"Purchase id: {receipt.purchase_id}\n"
        f"Date:        {when}\n\n"
        "You are registered for the course and can start right away.\n"
    )
    e = html.escape
    message.add_alternative(
        "<!doctype html><html><body>"
        "<p>Thank you for your purchase.</p>"
        "<table>"
        f"<tr><th align='left'>Course</th><td>{e(receipt.course_title)}</td></tr>"
        f"<tr><th align='left'>Amount</th><td>{e(amount)}</td></tr>"
        f"<tr><th align='left'>Purchase id</th><td>{e(receipt.purchase_id)}</td></tr>"
        f"<tr><th align='left'>Date</th><td>{e(when)}</td></tr>"
        "</table>"
        "<p>You are registered for the course and can start right away.</p>"
        "</body></html>",
        subtype="html",
    )
    return message


# --- the builder against the reference ----------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atoms = st.lists(st.text(st.sampled_from(ATEXT), min_size=1, max_size=12), min_size=1, max_size=3)
plain_addresses = st.builds(
    lambda local, domain: f"{'.'.join(local)}@{'.'.join(domain)}", atoms, atoms
)
# Addresses the email library takes but only its email policy writes as before.
unusual_addresses = st.sampled_from(
    [
        '"alice smith"@example.com',
        '"a\\"b"@example.com',
        "alice@[192.0.2.1]",
        "(work) alice@example.com",
        " alice@example.com ",
        "alice@exämple.com",
    ]
)
# One line of any text (non-BMP included), HTML specials, encoded-word look-alikes.
line_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=LINE_BREAKS), max_size=80
)
titles = st.one_of(
    line_text,
    st.text(st.sampled_from("<>&'\" =?_-.:;,aéß😀\t\x00"), max_size=120),
    st.text(st.sampled_from(string.ascii_letters + "  "), min_size=50, max_size=400),
    st.text(st.sampled_from(string.ascii_letters + "é入😀 "), min_size=200, max_size=1200),
)
display_names = st.one_of(line_text, st.sampled_from(["Kursladen Müller", "Shop, Inc.", ""]))
senders = st.one_of(
    st.just(MAIL_FROM),
    plain_addresses,
    st.builds(lambda name, address: f"{name} <{address}>", display_names, plain_addresses),
    st.builds(lambda name, address: formataddr((name, address)), display_names, plain_addresses),
    st.sampled_from(["receipts", "", "a@example.com, b@example.com", "Jörg <jörg@example.com>"]),
)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone.min]),
)
receipts = st.builds(
    Receipt,
    purchase_id=st.uuids().map(lambda value: value.hex),
    recipient=st.one_of(plain_addresses, unusual_addresses),
    course_title=titles,
    amount=st.decimals(min_value=0, max_value=Decimal("9999999999.99"), allow_nan=False),
    currency=st.from_regex(r"[A-Z]{3}", fullmatch=True),
    fulfilled_at=instants,
)


HEADERS = ["Subject", "From", "To", "Date", "Message-ID", "MIME-Version", "Content-Type"]


def reference_receipt(receipt: Receipt, mail_from: str) -> tuple[EmailMessage, EmailMessage] | None:
    """The reference's message and how a receiver reads it; None when the reference
    could not write the receipt: it raised (whatever exception) building it or writing
    it out, or what it wrote lost headers (a line break at the end of a title or sender
    ended the headers; its folder broke a From header such as "a\x80,\x80 <a@b.c>" in
    two lines, the second not indented)."""
    try:
        message = reference_build_receipt(receipt, mail_from)
        received = reparsed(message)
    except Exception:
        return None
    return (message, received) if list(received.keys()) == HEADERS else None


def assert_same_as_received(
    ours: EmailMessage, theirs: EmailMessage, *, subject: str, newline: str = "\n"
) -> None:
    """Every header value, the parts and their decoded texts (their line breaks read as
    ``newline``); the MIME boundary aside."""
    assert list(ours.keys()) == list(theirs.keys())
    for name, value in theirs.items():
        if name == "Content-Type":
            assert ours.get_content_type() == theirs.get_content_type() == value.content_type
        elif name == "Message-ID":
            # compat32 writes a Message-ID too long for one line (a long mail_from
            # domain) on the next one: the same msg-id, after folding white space.
            assert ours[name].strip() == value.strip()
        elif name == "Subject":
            # Or the Subject as it is, where email.policy.default's folder garbled it:
            # a leading space when it folded right after "Subject:", a doubled space
            # before an encoded word (the receipts still built under that policy keep
            # its reading).
            assert str(ours[name]) in (str(value), subject)
        else:
            assert str(ours[name]) == str(value), name
    assert ours["From"].addresses == theirs["From"].addresses
    assert ours["To"].addresses == theirs["To"].addresses
    assert ours["Date"].datetime == theirs["Date"].datetime
    assert ours.defects == theirs.defects == []
    ours_parts, theirs_parts = list(ours.iter_parts()), list(theirs.iter_parts())
    assert [part.get_content_type() for part in ours_parts] == ["text/plain", "text/html"]
    assert [part.get_content_type() for part in theirs_parts] == ["text/plain", "text/html"]
    for mine, reference in zip(ours_parts, theirs_parts, strict=True):
        assert mine.get_content_charset() == reference.get_content_charset() == "utf-8"
        mine_text, reference_text = mine.get_content(), reference.get_content()
        assert mine_text.replace(newline, "\n") == reference_text.replace(newline, "\n")
        assert mine.defects == reference.defects == []


@settings(max_examples=150, deadline=None)  # each example builds, writes, parses messages
@given(receipt=receipts, mail_from=senders)
@example(receipt=RECEIPT, mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="=?utf-8?q?hi?= there"), mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="a" + " " * 100 + "b"), mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="x" * 2000), mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="--==receipt-alternative=="), mail_from="")
@example(receipt=replace(RECEIPT, course_title="From here\t<&>\x00"), mail_from="Jörg <j@x.org>")
def test_receivers_read_the_same_receipt_as_from_the_reference(
    receipt: Receipt, mail_from: str
) -> None:
    reference = reference_receipt(receipt, mail_from)
    if reference is None:  # ours refuses what the reference could not write
        with pytest.raises(ValueError):
            build_receipt(receipt, mail_from=mail_from)
        return
    _, theirs_received = reference
    ours = build_receipt(receipt, mail_from=mail_from)
    subject = f"Your receipt: {receipt.course_title}"
    assert_same_as_received(reparsed(ours), theirs_received, subject=subject)


@settings(max_examples=300, deadline=None)
@given(
    receipt=receipts,
    title=st.one_of(st.none(), st.text(max_size=20)),
    recipient=st.one_of(st.none(), st.text(max_size=20), st.text(ATEXT + '@."<> ()', max_size=20)),
    mail_from=st.one_of(senders, st.text(max_size=30)),
)
def test_the_reference_and_the_builder_refuse_the_same_receipts(
    receipt: Receipt, title: str | None, recipient: str | None, mail_from: str
) -> None:
    """Any text: line breaks, lone surrogates, NULs, addresses of any shape. Where the
    reference could not write a receipt (see ``reference_receipt``), the builder raises
    ValueError (what the deliverer marks dead). It refuses nothing else but a title or
    sender with a line break at its very end, which the reference let through (into a
    broken message after "\n", or dropped after "\r", or kept in the Subject)."""
    receipt = replace(
        receipt,
        course_title=receipt.course_title if title is None else title,
        recipient=receipt.recipient if recipient is None else recipient,
    )
    if reference_receipt(receipt, mail_from) is None:
        with pytest.raises(ValueError):
            build_receipt(receipt, mail_from=mail_from)
        return
    try:
        build_receipt(receipt, mail_from=mail_from)
    except ValueError as exc:  # a line break the reference let through at the very end
        assert "line break" in str(exc)
        assert any(text.endswith(tuple(LINE_BREAKS)) for text in (receipt.course_title, mail_from))


# --- the receipt's policy: compat32, without its folder for headers that fit --------

header_names = st.sampled_from(["Subject", "From", "To", "Date", "Message-ID", "X-A"])


@settings(max_examples=500)
@given(
    name=header_names,
    value=st.one_of(
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=90),
        st.text(max_size=40),  # non-ASCII, control characters, line breaks
        st.text(" =?abc", max_size=90),  # runs of spaces, encoded-word look-alikes
    ),
    linesep=st.sampled_from(["\n", "\r\n"]),
)
@example(name="Subject", value="a" * 69, linesep="\n")  # "Subject: " + 69: 78, fits
@example(name="Subject", value="a" * 70, linesep="\n")  # one more: compat32's folder
@example(name="To", value=" leading and trailing ", linesep="\n")
def test_the_receipt_policy_folds_every_header_as_compat32_does(
    name: str, value: str, linesep: str
) -> None:
    ours, theirs = RECEIPT_POLICY.clone(linesep=linesep), compat32.clone(linesep=linesep)

    def outcome(fold: Callable[[], object]) -> object:
        try:
            return fold()
        except Exception as exc:  # the same refusal, if any
            return type(exc)

    assert outcome(lambda: ours.fold(name, value)) == outcome(lambda: theirs.fold(name, value))
    assert outcome(lambda: ours.fold_binary(name, value)) == outcome(
        lambda: theirs.fold_binary(name, value)
    )


@settings(max_examples=100, deadline=None)
@given(receipt=receipts, mail_from=senders)
@example(receipt=RECEIPT, mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="x" * 2000), mail_from=MAIL_FROM)
@example(receipt=replace(RECEIPT, course_title="Café ✓"), mail_from="Jörg <j@x.org>")
def test_a_receipt_is_written_byte_for_byte_as_compat32_writes_it(
    receipt: Receipt, mail_from: str
) -> None:
    """What the file mailer writes (``as_bytes()``, the message's own policy) is what
    ``compat32`` writes, the policy aiosmtplib writes a compat32 message with."""
    try:
        message = build_receipt(receipt, mail_from=mail_from)
    except ValueError:
        return
    if isinstance(message, EmailMessage):
        return  # the rare receipts still built under email.policy.default
    assert message.policy is RECEIPT_POLICY
    assert message.as_bytes() == message.as_bytes(policy=compat32)
    assert message.as_string() == message.as_string(policy=compat32)
