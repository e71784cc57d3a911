"""The receipt email: a MIME message with plain-text and HTML alternatives.

Its ``Message-ID`` is derived from the purchase alone, so every (re)send of one
purchase's receipt carries the same id and a receiver can drop duplicates.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr


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
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    domain = domain if at and domain else "localhost"
    return f"<receipt-{purchase_id}@{domain}>"


def build_receipt(receipt: Receipt, *, mail_from: str) -> EmailMessage:
    """Return the receipt as a ready-to-send message."""
    amount = f"{receipt.amount:.2f} {receipt.currency}"
    when = receipt.fulfilled_at.strftime("%Y-%m-%d %H:%M UTC")
    message = EmailMessage()
    message["Subject"] = f"Your receipt: {receipt.course_title}"
    message["From"] = mail_from
    message["To"] = Address(addr_spec=receipt.recipient)
    message["Date"] = format_datetime(receipt.fulfilled_at)
    message["Message-ID"] = message_id_for(receipt.purchase_id, mail_from)
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
