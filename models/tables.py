"""The tables: users, API tokens, courses, purchases, registrations, the receipt outbox,
the audit trail of purchase state changes and the counter that numbers it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntPk = BigInteger().with_variant(Integer(), "sqlite")

PURCHASE_STATES = ("pending", "fulfilled", "failed", "canceled")
OUTBOX_STATUSES = ("pending", "sent", "dead")
TOKEN_SCOPES = ("buyer", "staff", "payments")
EVENT_SOURCES = ("rpc", "webhook", "cli", "migration")
EVENT_EVIDENCE = ("payment_event", "payments_scope", "staff_comp")


# The condition of the partial index of open purchases; a query names it word for word.
PENDING_ONLY = "state = 'pending'"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    # The user's role as first issued; what a call may do is its token's ``scope``.
    is_staff: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """A bearer token. Only the SHA-256 of the token is stored; the token is shown once."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("scope", TOKEN_SCOPES), name="scope_known"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the token may do: buyer (own purchases), staff (support desk), payments (the
    # shop's payment backend). Per token, like a restricted API key.
    scope: Mapped[str] = mapped_column(String(16), default="buyer", server_default="buyer")


class Course(Base):
    __tablename__ = "courses"
    __table_args__ = (CheckConstraint("price >= 0", name="price_not_negative"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))


class Purchase(Base):
    __tablename__ = "purchases"
    __table_args__ = (
        CheckConstraint(_in("state", PURCHASE_STATES), name="state_known"),
        UniqueConstraint("owner_id", "idempotency_key"),
        # A user's purchases newest first: serves purchase.list's keyset paging.
        Index("ix_purchases_owner_id_id", "owner_id", "id"),
        # A user's purchases in one state, newest first: purchase.list with a state, and
        # the count of open purchases against the cap at each purchase.create.
        Index("ix_purchases_owner_id_state_id", "owner_id", "state", "id"),
        # Everyone's purchases in one state, newest first (staff's purchase.list).
        Index("ix_purchases_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    purchase_id: Mapped[str] = mapped_column(String(32), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    error_msg: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    fulfilled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The provider's reference of the payment that fulfilled it. UNIQUE: one payment
    # fulfils one purchase, whatever the application does.
    payment_ref: Mapped[str | None] = mapped_column(String(255), unique=True)


class CourseRegistration(Base):
    __tablename__ = "course_registrations"
    __table_args__ = (
        # A user's registrations newest first: serves registration.list's keyset paging.
        Index("ix_course_registrations_user_id_id", "user_id", "id"),
        # Whether a user holds a course (purchase.create).
        Index("ix_course_registrations_user_id_course_id", "user_id", "course_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    # UNIQUE: at most one registration per purchase, whatever the application does.
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReceiptOutbox(Base):
    """A receipt email waiting to be sent, written in the fulfillment's own transaction."""

    __tablename__ = "receipt_outbox"
    __table_args__ = (
        CheckConstraint(_in("status", OUTBOX_STATUSES), name="status_known"),
        # Pending rows by due time: serves the deliverer's claim query.
        Index("ix_receipt_outbox_status_next_attempt_at", "status", "next_attempt_at"),
        # A claim's rows, by its token (only claimed rows have one).
        Index(
            "ix_receipt_outbox_claim_token",
            "claim_token",
            sqlite_where=text("claim_token IS NOT NULL"),
            postgresql_where=text("claim_token IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True)
    # UNIQUE: at most one receipt per purchase.
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"), unique=True)
    recipient: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Set when a deliverer claims the row (a lease until next_attempt_at); only the
    # holder of the current claim may record the outcome.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The W3C traceparent of the call that queued it, when tracing was on: the delivery's
    # span continues that trace (rpc_server.observability.tracing).
    trace_context: Mapped[str | None] = mapped_column(String(64))


class RateLimitBucket(Base):
    """A token bucket per API token (keyed by the token's hash), shared by all processes."""

    __tablename__ = "rate_limit_buckets"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # How many calls the last request was granted (returned by the same UPSERT).
    last_granted: Mapped[int] = mapped_column(Integer)


class PurchaseEvent(Base):
    """One state change of a purchase, appended in the transaction that made it.

    ``seq`` comes from ``event_sequence`` (see there): strictly increasing in commit
    order, with no gaps, on every engine.
    """

    __tablename__ = "purchase_events"
    __table_args__ = (
        CheckConstraint(_in("to_state", PURCHASE_STATES), name="to_state_known"),
        CheckConstraint(_in("source", EVENT_SOURCES), name="source_known"),
        CheckConstraint(_in("actor_scope", TOKEN_SCOPES), name="actor_scope_known"),
        CheckConstraint(_in("evidence", EVENT_EVIDENCE), name="evidence_known"),
        # One purchase's history in order: serves purchase.events.
        Index("ix_purchase_events_purchase_id_seq", "purchase_id", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigIntPk, primary_key=True, autoincrement=False)
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"))
    # NULL: the purchase was created (or, for rows written by the migration, its state
    # before this history began is unknown).
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    # Who asked: a user through a token of this scope; both NULL for the payment webhook.
    actor_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    actor_scope: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    # Why a fulfilment was allowed: a verified payment event, a payments-scope token, or
    # a staff comp; NULL for changes that need no evidence.
    evidence: Mapped[str | None] = mapped_column(String(16))
    # The signed payment event's id (webhook-id), when one made the change.
    payment_event_id: Mapped[str | None] = mapped_column(String(255), index=True)
    payment_ref: Mapped[str | None] = mapped_column(String(255))
    error_msg: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EventSequence(Base):
    """One row: the last ``purchase_events.seq`` handed out.

    A transaction takes the next number in the statement that inserts its event, its
    last before COMMIT (``rpc_server.db.repositories.events``): on PostgreSQL with
    ``UPDATE … SET last_seq = last_seq + 1 RETURNING last_seq`` in a WITH of that
    INSERT. The row lock that UPDATE takes is held until the transaction ends, so a
    second writer waits for the first to commit (or roll back) before it numbers its
    event: numbers follow commit order and a rolled-back number is given out again,
    never skipped. On SQLite the INSERT reads ``last_seq + 1`` and the trigger
    ``purchase_events_sequence`` (migration 0009) moves ``last_seq``; writers are
    serialized by ``BEGIN IMMEDIATE`` anyway.
    """

    __tablename__ = "event_sequence"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger)
