"""The receipt outbox as the domain sees it: a message's status and the records the
outbox port (``ports.ReceiptOutboxRepository``) hands out.

A receipt is written ``pending`` in the fulfilment's own transaction, then claimed by a
deliverer (``rpc_server.mail.deliverer``) and settled:

| status  | means                                   | next                                  |
|---|---|---|
| pending | due at ``next_attempt_at`` (or leased)  | sent, pending again (backoff), dead   |
| sent    | handed to the mail server (final)       | never claimed again                   |
| dead    | refused, or out of attempts             | pending again only by ``mail-retry``  |

The database holds the same three values under a CHECK constraint
(``models.tables.OUTBOX_STATUSES``, ``ck_receipt_outbox_status_known``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from rpc_server.mail.receipts import Receipt


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class ReceiptJob:
    """A claimed outbox row: which row, how many attempts so far, and what to send."""

    outbox_id: int
    attempts: int
    receipt: Receipt
    # The traceparent of the call that queued it (None: not traced).
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One message as ``mail-status`` lists it."""

    outbox_id: int
    purchase_id: str
    recipient: str
    status: OutboxStatus
    attempts: int
    # Pending: when it is due (a claimed one: when its lease ends); dead: when it died.
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ReceiptBacklog:
    """What is not sent: pending and dead receipts, and when the oldest pending one was
    queued (None: none is pending). The metrics' view of the outbox."""

    pending: int
    dead: int
    oldest_pending_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxOverview:
    """How many messages are in each status (every status present, zeros included) and
    the newest messages, newest first."""

    counts: Mapping[OutboxStatus, int]
    entries: list[OutboxEntry]
