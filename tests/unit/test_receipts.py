"""The receipt message: headers, both alternatives, escaping, a stable Message-ID."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from email.message import EmailMessage

from rpc_server.mail.receipts import Receipt, build_receipt, message_id_for

MAIL_FROM = "Course Shop <receipts@shop.example>"
RECEIPT = Receipt(
    purchase_id="0123456789abcdef0123456789abcdef",
    recipient="alice@example.com",
    course_title="Python Basics",
    amount=Decimal("49"),
    currency="USD",
    fulfilled_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
)


def reparsed(message: EmailMessage) -> EmailMessage:
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
    message = build_receipt(receipt, mail_from=MAIL_FROM)
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
