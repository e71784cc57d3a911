"""What the domain needs from storage, as Protocols.

The SQL implementation lives in ``rpc_server.db`` (``unit_of_work``, ``repositories``);
unit tests use in-memory fakes of the same shape (``tests/unit/fakes.py``).
Repositories never commit: the unit of work does, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Protocol, Self

from rpc_server.domain.outbox import OutboxEntry, OutboxStatus, ReceiptBacklog, ReceiptJob
from rpc_server.domain.records import (
    Actor,
    Course,
    NewPurchaseEvent,
    PaymentEvent,
    Purchase,
    PurchaseEventRecord,
    PurchaseUpdate,
    Registration,
    SignedPayment,
    StateChange,
    UpdateScope,
)
from rpc_server.domain.states import PurchaseState, Scope


class CourseRepository(Protocol):
    async def list_all(self) -> list[Course]: ...

    async def get_by_slug(self, slug: str) -> Course | None: ...

    async def save(self, *, slug: str, title: str, price: Decimal, currency: str) -> Course:
        """Create the course, or update the one with this slug."""
        ...


class PurchaseRepository(Protocol):
    async def add(
        self,
        *,
        purchase_id: str,
        owner_id: int,
        course: Course,
        idempotency_key: str | None,
        now: datetime,
    ) -> Purchase | None:
        """Insert a purchase; return None if (owner, idempotency_key) already exists."""
        ...

    async def get(self, purchase_id: str, *, owner_id: int | None) -> Purchase | None:
        """Return the purchase, only if owned by ``owner_id`` (None: any owner)."""
        ...

    async def get_by_idempotency_key(self, owner_id: int, key: str) -> Purchase | None: ...

    async def list_page(
        self,
        *,
        owner_id: int | None,
        state: PurchaseState | None,
        limit: int,
        before: int | None,
    ) -> list[Purchase]:
        """Return up to ``limit`` purchases with pk < ``before``, newest first."""
        ...

    async def transition(
        self,
        pk: int,
        *,
        sources: frozenset[PurchaseState],
        target: PurchaseState,
        error_msg: str | None,
        now: datetime,
        payment_ref: str | None = None,
    ) -> StateChange | None:
        """Atomically move the purchase to ``target`` if its state is in ``sources``.

        Returns what this call changed (applied to the purchase as read, it is the
        purchase as the database now holds it), or None if the state was not one of
        ``sources``. This is one conditional UPDATE in the database (its RETURNING
        saves reading the purchase again), never a read-then-write, so concurrent
        callers cannot both win.
        ``payment_ref`` is recorded with a fulfilment; if another purchase already holds
        it (a race the caller's check could not see), raises
        ``PaymentNotVerified("reused")`` and the unit of work must be abandoned.
        """
        ...

    async def holder_of_payment_ref(self, payment_ref: str) -> int | None:
        """Return the pk of the purchase fulfilled with this payment, if any."""
        ...

    async def count_pending(self, owner_id: int) -> int:
        """How many of the owner's purchases are pending (open)."""
        ...


class RegistrationRepository(Protocol):
    async def add(self, purchase: Purchase, *, now: datetime) -> None: ...

    async def exists(self, user_id: int, course_pk: int) -> bool:
        """True if the user is registered for the course (by any purchase)."""
        ...

    async def list_page(
        self, user_id: int, *, limit: int, before: int | None
    ) -> list[Registration]:
        """Return up to ``limit`` of the user's registrations with pk < ``before``, newest
        first."""
        ...


class ReceiptOutboxRepository(Protocol):
    """The receipt outbox (``rpc_server.domain.outbox``): rows written with
    fulfilments, claimed under a lease and settled by deliverers, inspected and requeued
    by the operator. Every write here is one conditional statement, so two deliverers
    (or a deliverer and the operator) never both win a row."""

    async def add(self, purchase: Purchase, *, now: datetime) -> None:
        """Queue the purchase's receipt, due ``now``, in the fulfilment's transaction.

        At most one receipt per purchase (UNIQUE in the database).
        """
        ...

    async def claim_due(
        self, *, now: datetime, lease_until: datetime, token: str, limit: int
    ) -> list[ReceiptJob]:
        """Claim up to ``limit`` pending messages due by ``now``, oldest due first,
        leasing them to ``token`` (a new one per claim) until ``lease_until``.

        Each claimed message counts one more attempt and is not due again before
        ``lease_until``: a deliverer that dies mid-send leaves it to be retried, never
        lost. Messages another claim holds are skipped.
        """
        ...

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
        """Record how a claimed send went and end the claim; False (nothing changed) if
        the claim under ``token`` is no longer the message's.

        ``sent`` records ``now`` as the sending time; ``pending`` is due again at
        ``next_attempt_at``; ``dead`` is never due again (``now`` is kept as when it
        died). ``error`` (cut to 2000 characters) replaces the last error when given.
        """
        ...

    async def settle_sent(
        self, outbox_ids: Sequence[int], *, token: str, now: datetime
    ) -> set[int]:
        """``settle`` with status ``sent`` for many claimed messages at once (a claim's
        successful sends, recorded together); returns the ids whose claim under
        ``token`` was still theirs, the only ones changed."""
        ...

    async def release(self, token: str, *, now: datetime) -> None:
        """Give back messages claimed under ``token`` but not attempted (a deliverer
        stopping): due ``now``, their claimed attempt not counted."""
        ...

    async def renew(self, token: str, *, lease_until: datetime) -> None:
        """Extend to ``lease_until`` the lease of the messages still claimed under
        ``token`` (a deliverer whose sends outlast the lease, renewing it as it goes:
        the lease can then be short, and a dead deliverer's messages are soon due)."""
        ...

    async def requeue(self, outbox_id: int, *, now: datetime) -> bool:
        """Put a dead message back in the queue, due ``now`` with fresh attempts; False
        (nothing changed) if it is not dead or does not exist."""
        ...

    async def status_of(self, outbox_id: int) -> OutboxStatus | None:
        """The message's status; None if there is no such message."""
        ...

    async def overview(self, *, limit: int) -> list[OutboxEntry]:
        """The newest ``limit`` messages, whatever their status, newest first."""
        ...

    async def counts(self) -> dict[OutboxStatus, int]:
        """How many messages are in each status (statuses with none are left out)."""
        ...

    async def backlog(self) -> ReceiptBacklog:
        """The messages not sent (pending, dead) and the oldest pending one's age."""
        ...


class PurchaseEventRepository(Protocol):
    """The audit trail: one row per state change, in the transaction that made it."""

    async def append(self, event: NewPurchaseEvent, *, now: datetime) -> int:
        """Append the event and return its sequence number.

        Call it last before committing: numbering holds a lock until the transaction
        ends (see ``models.EventSequence``).
        """
        ...

    async def list_for(self, purchase_pk: int) -> list[PurchaseEventRecord]:
        """One purchase's history, oldest first."""
        ...

    async def payment_event_applied(self, event_id: str) -> bool:
        """True if the payment event with this id already changed a purchase."""
        ...

    async def latest_seq(self) -> int:
        """The sequence number of the latest event (0 when there is none)."""
        ...

    async def updates_after(
        self, after: int, scope: UpdateScope, *, upto: int | None = None, limit: int
    ) -> list[PurchaseUpdate]:
        """The events with ``after < seq <= upto`` (no upper bound: None) of purchases in
        ``scope``, oldest first, at most ``limit``, each with its purchase as it is now."""
        ...


class PaymentVerifier(Protocol):
    """Checks a signed payment event: keys, signature, timestamp, payload shape."""

    @property
    def configured(self) -> bool:
        """False when no key is configured: then nothing ever verifies (fail closed)."""
        ...

    def verify(self, signed: SignedPayment) -> PaymentEvent:
        """Return the verified event; raise PaymentNotVerified with the reason otherwise
        (``invalid_signature``, ``expired`` or ``malformed``)."""
        ...


class UserRepository(Protocol):
    async def find_actor(self, token_hash: str, *, now: datetime) -> Actor | None:
        """Return the owner of a live (not expired, not revoked) token, or None."""
        ...

    async def hold(self, user_id: int) -> None:
        """Hold the user's row until the transaction ends: transactions that hold it run
        one after another for that user (a count then an insert cannot race). Writes of
        rows that merely refer to the user do not wait for it."""
        ...

    async def ensure_user(self, email: str, *, is_staff: bool, now: datetime) -> int:
        """Return the id of the user with this email, creating it if needed (``is_staff``
        is its role then). An existing user is never changed."""
        ...

    async def add_token(
        self,
        user_id: int,
        token_hash: str,
        *,
        scope: Scope,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> bool:
        """Store a token hash of this scope for the user; False if that hash is already
        stored (the stored token is left as it is)."""
        ...

    async def revoke_token(self, token_hash: str, *, now: datetime) -> bool:
        """Revoke one live token; False if there is no such live token."""
        ...

    async def revoke_tokens_of(self, email: str, *, now: datetime) -> int:
        """Revoke every live token of a user; return how many."""
        ...


class UnitOfWork(Protocol):
    """One transaction: rolled back on exit unless ``commit`` was called."""

    @property
    def users(self) -> UserRepository: ...

    @property
    def courses(self) -> CourseRepository: ...

    @property
    def purchases(self) -> PurchaseRepository: ...

    @property
    def registrations(self) -> RegistrationRepository: ...

    @property
    def receipts(self) -> ReceiptOutboxRepository: ...

    @property
    def events(self) -> PurchaseEventRepository: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self, *, write: bool = False) -> UnitOfWork:
        """Return a new unit of work; ``write=True`` if it will write."""
        ...

    def expect_purchase(self, purchase_id: str) -> None:
        """A hint: a unit of work made by this factory will soon read this purchase by id
        (``purchases.get``). A factory may read several expected purchases at once, or
        ignore the hint; what each read answers is the same either way."""
        ...
