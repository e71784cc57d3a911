"""The receipt outbox port on SQL (``ports.ReceiptOutboxRepository``): rows written
with fulfillments, claimed and settled by deliverers, listed and requeued by the operator.

Statuses are ``OutboxStatus`` values; the column's CHECK constraint refuses any other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Update, bindparam, func, insert, or_, select, update

from models import Course as CourseRow
from models import Purchase as PurchaseRow
from models import ReceiptOutbox as ReceiptRow
from rpc_server.db.repositories.rows import UnitOfWorkConnection, as_utc, id_binds, id_chunks
from rpc_server.domain.outbox import OutboxEntry, OutboxStatus, ReceiptBacklog, ReceiptJob
from rpc_server.domain.records import Purchase
from rpc_server.mail.receipts import Receipt
from rpc_server.observability.trace_context import current_traceparent

# The values as stored, bound into the statements below.
_PENDING, _DEAD = OutboxStatus.PENDING.value, OutboxStatus.DEAD.value

_INSERT_RECEIPT = insert(ReceiptRow)
# One statement claims: the due rows (skipping those another deliverer's claim has
# locked, on PostgreSQL) get this claim's token and lease; the next reads them back.
_DUE = (
    select(ReceiptRow.id)
    .where(ReceiptRow.status == _PENDING, ReceiptRow.next_attempt_at <= bindparam("now"))
    .order_by(ReceiptRow.next_attempt_at, ReceiptRow.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_CLAIM_DUE = (
    update(ReceiptRow)
    .where(ReceiptRow.id.in_(_DUE.scalar_subquery()))
    .values(
        claim_token=bindparam("token"),
        next_attempt_at=bindparam("lease_until"),
        attempts=ReceiptRow.attempts + 1,
    )
)
_CLAIMED = (
    select(
        ReceiptRow.id,
        ReceiptRow.attempts,
        ReceiptRow.recipient,
        PurchaseRow.purchase_id,
        CourseRow.title,
        PurchaseRow.amount,
        PurchaseRow.currency,
        PurchaseRow.fulfilled_at,
        PurchaseRow.updated_at,
        ReceiptRow.trace_context,
    )
    .join(PurchaseRow, PurchaseRow.id == ReceiptRow.purchase_id)
    .join(CourseRow, CourseRow.id == PurchaseRow.course_id)
    .where(ReceiptRow.claim_token == bindparam("token"))
    .order_by(ReceiptRow.id)
)
# A settled row is no longer claimed; what is not known (no sending time for a retry,
# no error for a success) keeps its value.
_SETTLE = (
    update(ReceiptRow)
    .where(ReceiptRow.id == bindparam("outbox_id"), ReceiptRow.claim_token == bindparam("token"))
    .values(
        status=bindparam("new_status"),
        claim_token=None,
        sent_at=func.coalesce(bindparam("sent", type_=ReceiptRow.sent_at.type), ReceiptRow.sent_at),
        next_attempt_at=func.coalesce(
            bindparam("next_attempt", type_=ReceiptRow.next_attempt_at.type),
            ReceiptRow.next_attempt_at,
        ),
        last_error=func.coalesce(
            bindparam("error", type_=ReceiptRow.last_error.type), ReceiptRow.last_error
        ),
    )
    .returning(ReceiptRow.id)
)


@functools.cache
def _settle_sent(count: int) -> Update:
    """Settle ``count`` sends that went out (``id_0`` …) in one statement, each only if
    still claimed under ``token``: the usual end of a claim costs one round trip, not one
    per message. Built and compiled once per count, like ``_purchases_by_ids``."""
    return (
        update(ReceiptRow)
        .where(ReceiptRow.id.in_(id_binds(count)), ReceiptRow.claim_token == bindparam("token"))
        .values(status=OutboxStatus.SENT.value, claim_token=None, sent_at=bindparam("now"))
        .returning(ReceiptRow.id)
    )


_RELEASE = (
    update(ReceiptRow)
    .where(ReceiptRow.claim_token == bindparam("token"), ReceiptRow.status == _PENDING)
    .values(claim_token=None, next_attempt_at=bindparam("now"), attempts=ReceiptRow.attempts - 1)
)
# The claim's lease, extended while its sends are still going on.
_RENEW = (
    update(ReceiptRow)
    .where(ReceiptRow.claim_token == bindparam("token"), ReceiptRow.status == _PENDING)
    .values(next_attempt_at=bindparam("lease_until"))
)
_REQUEUE = (
    update(ReceiptRow)
    .where(ReceiptRow.id == bindparam("outbox_id"), ReceiptRow.status == _DEAD)
    .values(status=_PENDING, attempts=0, next_attempt_at=bindparam("now"), claim_token=None)
    .returning(ReceiptRow.id)
)
_STATUS_OF = select(ReceiptRow.status).where(ReceiptRow.id == bindparam("outbox_id"))
_OVERVIEW = (
    select(
        ReceiptRow.id,
        PurchaseRow.purchase_id,
        ReceiptRow.recipient,
        ReceiptRow.status,
        ReceiptRow.attempts,
        ReceiptRow.next_attempt_at,
        ReceiptRow.sent_at,
        ReceiptRow.last_error,
    )
    .join(PurchaseRow, PurchaseRow.id == ReceiptRow.purchase_id)
    .order_by(ReceiptRow.id.desc())
    .limit(bindparam("limit"))
)
_COUNTS = select(ReceiptRow.status, func.count()).group_by(ReceiptRow.status)
# Only the unsent rows, found by the (status, next_attempt_at) index: a scrape's cost does
# not grow with the receipts ever sent.
_BACKLOG = (
    select(ReceiptRow.status, func.count(), func.min(ReceiptRow.created_at))
    .where(or_(ReceiptRow.status == _PENDING, ReceiptRow.status == _DEAD))
    .group_by(ReceiptRow.status)
)


class SqlReceiptOutboxRepository:
    """The outbox: rows written with fulfillments, claimed and settled by deliverers.

    ``added`` counts the receipts this unit of work queued: after its commit the unit of
    work wakes the deliverer if there are any.
    """

    def __init__(self, connection: UnitOfWorkConnection):
        self.connection = connection
        self.added = 0

    async def add(self, purchase: Purchase, *, now: datetime) -> None:
        self.added += 1
        await self.connection.execute(
            _INSERT_RECEIPT,
            {
                "purchase_id": purchase.pk,
                "recipient": purchase.owner_email,
                "status": _PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                # The call's trace, when it is traced (rpc_server.observability).
                "trace_context": current_traceparent.get(),
            },
        )

    async def claim_due(
        self, *, now: datetime, lease_until: datetime, token: str, limit: int
    ) -> list[ReceiptJob]:
        """Claim up to ``limit`` pending rows that are due, leasing them to ``token``
        (a new one per claim).

        A claimed row is not due again until ``lease_until``, so a deliverer that dies
        mid-send leaves its rows to be retried, never lost. On PostgreSQL rows locked
        by another deliverer's claim are skipped (FOR UPDATE SKIP LOCKED); SQLite
        serializes claims with BEGIN IMMEDIATE instead.
        """
        await self.connection.execute(
            _CLAIM_DUE,
            {"now": now, "limit": limit, "token": token, "lease_until": lease_until},
        )
        rows = await self.connection.execute(_CLAIMED, {"token": token})
        return [
            ReceiptJob(
                outbox_id=outbox_id,
                attempts=attempts,
                receipt=Receipt(
                    purchase_id=purchase_id,
                    recipient=recipient,
                    course_title=title,
                    amount=amount,
                    currency=currency,
                    fulfilled_at=as_utc(fulfilled_at or updated_at),
                ),
                trace_context=trace_context,
            )
            for (outbox_id, attempts, recipient, purchase_id, title, amount, currency,
                 fulfilled_at, updated_at, trace_context) in rows
        ]  # fmt: skip

    async def settle(
        self,
        outbox_id: int,
        *,
        token: str,
        status: OutboxStatus,
        now: datetime,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the outcome of a claimed send; False if the claim is no longer ours."""
        status = OutboxStatus(status)  # a bad value fails here, before the CHECK would
        if status is OutboxStatus.DEAD:
            # Never attempted again: next_attempt_at keeps when it died (mail-status).
            next_attempt_at = now
        params = {
            "outbox_id": outbox_id,
            "token": token,
            "new_status": status.value,
            "sent": now if status is OutboxStatus.SENT else None,
            "next_attempt": next_attempt_at,
            "error": None if error is None else error[:2000],
        }
        result = await self.connection.execute(_SETTLE, params)
        return result.first() is not None

    async def settle_sent(
        self, outbox_ids: Sequence[int], *, token: str, now: datetime
    ) -> set[int]:
        """Record that the claimed messages ``outbox_ids`` were sent at ``now``; returns
        those still claimed under ``token`` (the others are left as they are)."""
        settled: set[int] = set()
        for count, ids in id_chunks(outbox_ids):
            params = {**ids, "token": token, "now": now}
            result = await self.connection.execute(_settle_sent(count), params)
            settled.update(result.scalars())
        return settled

    async def release(self, token: str, *, now: datetime) -> None:
        """Give back rows claimed under ``token`` but not attempted (shutting down)."""
        await self.connection.execute(_RELEASE, {"token": token, "now": now})

    async def renew(self, token: str, *, lease_until: datetime) -> None:
        """Extend the lease of the messages still claimed under ``token``."""
        await self.connection.execute(_RENEW, {"token": token, "lease_until": lease_until})

    async def requeue(self, outbox_id: int, *, now: datetime) -> bool:
        """Put a dead message back in the queue with fresh attempts; False if not dead."""
        result = await self.connection.execute(_REQUEUE, {"outbox_id": outbox_id, "now": now})
        return result.first() is not None

    async def status_of(self, outbox_id: int) -> OutboxStatus | None:
        """The message's status; None if there is no such message."""
        status = await self.connection.scalar(_STATUS_OF, {"outbox_id": outbox_id})
        return None if status is None else OutboxStatus(status)

    async def overview(self, *, limit: int) -> list[OutboxEntry]:
        """The newest ``limit`` messages, whatever their status."""
        rows = await self.connection.execute(_OVERVIEW, {"limit": limit})
        return [
            OutboxEntry(
                outbox_id=outbox_id,
                purchase_id=purchase_id,
                recipient=recipient,
                status=OutboxStatus(status),
                attempts=attempts,
                next_attempt_at=as_utc(next_attempt_at),
                sent_at=None if sent_at is None else as_utc(sent_at),
                last_error=last_error,
            )
            for (outbox_id, purchase_id, recipient, status, attempts, next_attempt_at, sent_at,
                 last_error) in rows
        ]  # fmt: skip

    async def counts(self) -> dict[OutboxStatus, int]:
        """How many messages are in each status (statuses with none are left out)."""
        rows = await self.connection.execute(_COUNTS)
        return {OutboxStatus(status): int(count) for status, count in rows}

    async def backlog(self) -> ReceiptBacklog:
        rows = {
            status: (count, oldest)
            for status, count, oldest in await self.connection.execute(_BACKLOG)
        }
        pending, oldest = rows.get(OutboxStatus.PENDING.value, (0, None))
        dead, _ = rows.get(OutboxStatus.DEAD.value, (0, None))
        return ReceiptBacklog(
            pending=int(pending),
            dead=int(dead),
            oldest_pending_at=None if oldest is None else as_utc(oldest),
        )
