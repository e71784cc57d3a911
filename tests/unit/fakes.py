"""In-memory fakes of the ports in ``rpc_server.domain.ports``, for the unit tests.

A ``FakeStore`` is the "database": committed rows. Each ``FakeUnitOfWork`` copies the
committed store on enter and works on that copy; ``commit`` publishes the copy, and
leaving without a commit discards it, like a rolled-back transaction. Read-only units
of work (``factory()``) refuse to write, so a service that forgets ``write=True`` fails.

The database guarantees the SQL schema gives are enforced here too: one registration
and one receipt per purchase, a receipt status among ``OutboxStatus`` (the CHECK), one
purchase per owner and idempotency key, one purchase per ``payment_ref``
(``purchases.payment_ref`` is UNIQUE: the repository turns that violation into
``PaymentNotVerified("reused")`` as the SQL one does), and events that name an existing
purchase and user. Event sequence numbers are handed out in append
order, one more than the last; a rolled-back number is given out again (no gaps).

To act out concurrency, ``FakeUnitOfWorkFactory.interleave`` runs another writer's
committed change just before a repository call of the unit of work under test, and
makes it visible to that call (READ COMMITTED, as a conditional UPDATE sees it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Self

from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.outbox import OutboxEntry, OutboxStatus, ReceiptBacklog, ReceiptJob
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import (
    WEBHOOK_ACTOR,
    Actor,
    Backing,
    Course,
    EventActor,
    NewPurchaseEvent,
    Purchase,
    PurchaseEventRecord,
    PurchaseUpdate,
    Registration,
    Source,
    StateChange,
    UpdateScope,
)
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.domain.tokens import hash_token
from rpc_server.mail.receipts import Receipt


class UniqueViolation(Exception):
    """What the database's unique constraints would raise."""


class ForeignKeyViolation(Exception):
    """What the database's foreign keys would raise."""


class CheckViolation(Exception):
    """What the database's CHECK constraints would raise."""


class ReadOnlyUnitOfWork(AssertionError):
    """A write was attempted in a unit of work opened without ``write=True``."""


class FixedClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def timestamp(self) -> float:
        """The same moment as Unix seconds (the payment verifier's clock)."""
        return self.now.timestamp()

    def advance(self, seconds: float = 1) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass(frozen=True)
class UserRow:
    """A user: ``is_staff`` is its role, fixed when it was created."""

    user_id: int
    email: str
    is_staff: bool


@dataclass(frozen=True)
class TokenRow:
    user_id: int
    token_hash: str
    scope: Scope
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class PurchaseRow:
    purchase: Purchase
    idempotency_key: str | None
    payment_ref: str | None = None


@dataclass(frozen=True)
class RegistrationRow:
    pk: int
    purchase_pk: int
    purchase_id: str
    user_id: int
    course_pk: int
    course_slug: str
    created_at: datetime


@dataclass(frozen=True)
class ReceiptRow:
    """One ``receipt_outbox`` row."""

    pk: int
    purchase_pk: int
    recipient: str
    created_at: datetime
    next_attempt_at: datetime
    status: OutboxStatus = OutboxStatus.PENDING
    attempts: int = 0
    last_error: str | None = None
    claim_token: str | None = None
    sent_at: datetime | None = None

    def __post_init__(self) -> None:
        # The CHECK constraint on receipt_outbox.status.
        if not isinstance(self.status, OutboxStatus):
            raise CheckViolation(f"receipt status {self.status!r} is not an OutboxStatus")


@dataclass(frozen=True)
class EventRow:
    """One ``purchase_events`` row."""

    seq: int
    purchase_pk: int
    from_state: PurchaseState | None
    to_state: PurchaseState
    actor_user_id: int | None
    actor_scope: Scope | None
    source: Source
    backing: Backing | None
    payment_event_id: str | None
    payment_ref: str | None
    error_msg: str | None
    created_at: datetime


@dataclass
class FakeStore:
    """The rows of the fake database. Records are frozen, so copies share them safely."""

    users: dict[int, UserRow] = field(default_factory=dict)
    tokens: dict[str, TokenRow] = field(default_factory=dict)
    courses: dict[str, Course] = field(default_factory=dict)
    purchases: dict[int, PurchaseRow] = field(default_factory=dict)
    registrations: list[RegistrationRow] = field(default_factory=list)
    receipts: list[ReceiptRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    next_pk: int = 1
    last_seq: int = 0  # the one row of event_sequence

    def clone(self) -> FakeStore:
        return FakeStore(
            users=dict(self.users),
            tokens=dict(self.tokens),
            courses=dict(self.courses),
            purchases=dict(self.purchases),
            registrations=list(self.registrations),
            receipts=list(self.receipts),
            events=list(self.events),
            next_pk=self.next_pk,
            last_seq=self.last_seq,
        )

    def new_pk(self) -> int:
        pk = self.next_pk
        self.next_pk += 1
        return pk

    def purchase_by_id(self, purchase_id: str) -> PurchaseRow | None:
        for row in self.purchases.values():
            if row.purchase.purchase_id == purchase_id:
                return row
        return None

    def holder_of(self, payment_ref: str) -> int | None:
        for pk, row in self.purchases.items():
            if row.payment_ref == payment_ref:
                return pk
        return None

    # The writes, shared by the repositories and by the concurrent writers of tests.

    def add_user(self, email: str, *, is_staff: bool) -> UserRow:
        if any(user.email == email for user in self.users.values()):
            raise UniqueViolation(f"user {email} exists")
        user = UserRow(self.new_pk(), email, is_staff)
        self.users[user.user_id] = user
        return user

    def set_state(
        self,
        pk: int,
        *,
        sources: frozenset[PurchaseState],
        target: PurchaseState,
        error_msg: str | None,
        now: datetime,
        payment_ref: str | None = None,
    ) -> bool:
        """The conditional UPDATE of ``SqlPurchaseRepository.transition``: it sets
        ``payment_ref`` with a fulfilment, under the UNIQUE constraint."""
        row = self.purchases.get(pk)
        if row is None or row.purchase.state not in sources:
            return False
        updated = replace(row.purchase, state=target, error_msg=error_msg, updated_at=now)
        stored_ref = row.payment_ref
        if target is PurchaseState.FULFILLED:
            updated = replace(updated, fulfilled_at=now)
            holder = None if payment_ref is None else self.holder_of(payment_ref)
            if holder is not None and holder != pk:
                raise UniqueViolation(f"payment_ref {payment_ref} is held by purchase {holder}")
            stored_ref = payment_ref
        self.purchases[pk] = replace(row, purchase=updated, payment_ref=stored_ref)
        return True

    def add_registration(self, purchase: Purchase, *, now: datetime) -> None:
        if any(r.purchase_pk == purchase.pk for r in self.registrations):
            raise UniqueViolation(f"registration for purchase {purchase.pk} exists")
        self.registrations.append(
            RegistrationRow(
                pk=self.new_pk(),
                purchase_pk=purchase.pk,
                purchase_id=purchase.purchase_id,
                user_id=purchase.owner_id,
                course_pk=purchase.course_pk,
                course_slug=purchase.course_slug,
                created_at=now,
            )
        )

    def add_receipt(self, purchase: Purchase, *, now: datetime) -> None:
        if any(r.purchase_pk == purchase.pk for r in self.receipts):
            raise UniqueViolation(f"receipt for purchase {purchase.pk} exists")
        self.receipts.append(
            ReceiptRow(
                pk=self.new_pk(),
                purchase_pk=purchase.pk,
                recipient=purchase.owner_email,
                created_at=now,
                next_attempt_at=now,
            )
        )

    def change_receipts(
        self, rows: Callable[[ReceiptRow], bool], change: Callable[[ReceiptRow], ReceiptRow]
    ) -> list[int]:
        """One UPDATE of receipt_outbox: ``change`` each row ``rows`` selects; return the
        pks changed."""
        changed = []
        for index, row in enumerate(self.receipts):
            if rows(row):
                self.receipts[index] = change(row)
                changed.append(row.pk)
        return changed

    def add_purchase(
        self,
        *,
        purchase_id: str,
        owner_id: int,
        course: Course,
        idempotency_key: str | None,
        now: datetime,
    ) -> Purchase | None:
        if idempotency_key is not None and any(
            row.idempotency_key == idempotency_key and row.purchase.owner_id == owner_id
            for row in self.purchases.values()
        ):
            return None
        if self.purchase_by_id(purchase_id) is not None:
            raise UniqueViolation(f"purchase_id {purchase_id} exists")
        owner = self.users[owner_id]
        purchase = Purchase(
            pk=self.new_pk(),
            purchase_id=purchase_id,
            owner_id=owner_id,
            owner_email=owner.email,
            course_pk=course.pk,
            course_slug=course.slug,
            course_title=course.title,
            amount=course.price,
            currency=course.currency,
            state=PurchaseState.PENDING,
            error_msg=None,
            created_at=now,
            updated_at=now,
            fulfilled_at=None,
        )
        self.purchases[purchase.pk] = PurchaseRow(purchase, idempotency_key)
        return purchase

    def append_event(self, event: NewPurchaseEvent, *, now: datetime) -> int:
        """The INSERT into purchase_events, numbered from event_sequence."""
        if event.purchase_pk not in self.purchases:
            raise ForeignKeyViolation(f"no purchase {event.purchase_pk}")
        if event.actor.user_id is not None and event.actor.user_id not in self.users:
            raise ForeignKeyViolation(f"no user {event.actor.user_id}")
        self.last_seq += 1
        self.events.append(
            EventRow(
                seq=self.last_seq,
                purchase_pk=event.purchase_pk,
                from_state=event.from_state,
                to_state=event.to_state,
                actor_user_id=event.actor.user_id,
                actor_scope=event.actor.scope,
                source=event.source,
                backing=event.backing,
                payment_event_id=event.payment_event_id,
                payment_ref=event.payment_ref,
                error_msg=event.error_msg,
                created_at=now,
            )
        )
        return self.last_seq


# A change another transaction commits while the unit of work under test runs.
Writer = Callable[[FakeStore], None]


def winner_moves(
    purchase_id: str,
    target: PurchaseState,
    *,
    now: datetime,
    error_msg: str | None = None,
    payment_ref: str | None = None,
    payment_event_id: str | None = None,
    actor: EventActor = WEBHOOK_ACTOR,
    source: Source = Source.WEBHOOK,
    backing: Backing | None = None,
) -> Writer:
    """Another ``fulfill_purchase`` (or webhook) call that wins: the state change from
    the state it read, its side effects and its audit event, as a real winner writes
    them. By default the winner is the payment webhook."""

    def write(store: FakeStore) -> None:
        row = store.purchase_by_id(purchase_id)
        assert row is not None
        current = row.purchase.state
        assert current is not target, "the concurrent writer must change the state"
        message = error_msg if target is PurchaseState.FAILED else None
        moved = store.set_state(
            row.purchase.pk,
            sources=frozenset({current}),
            target=target,
            error_msg=message,
            payment_ref=payment_ref,
            now=now,
        )
        assert moved, "the concurrent writer must change the state"
        if target is PurchaseState.FULFILLED:
            moved_row = store.purchases[row.purchase.pk]
            store.add_registration(moved_row.purchase, now=now)
            store.add_receipt(moved_row.purchase, now=now)
        store.append_event(
            NewPurchaseEvent(
                purchase_pk=row.purchase.pk,
                from_state=current,
                to_state=target,
                actor=actor,
                source=source,
                backing=backing,
                payment_event_id=payment_event_id,
                payment_ref=payment_ref,
                error_msg=message,
            ),
            now=now,
        )

    return write


def winner_creates(
    purchase_id: str, owner_id: int, course_slug: str, idempotency_key: str, *, now: datetime
) -> Writer:
    """Another ``create_purchase`` call with the same idempotency key that wins."""

    def write(store: FakeStore) -> None:
        created = store.add_purchase(
            purchase_id=purchase_id,
            owner_id=owner_id,
            course=store.courses[course_slug],
            idempotency_key=idempotency_key,
            now=now,
        )
        assert created is not None
        store.append_event(
            NewPurchaseEvent(
                purchase_pk=created.pk,
                from_state=None,
                to_state=PurchaseState.PENDING,
                actor=EventActor(owner_id, Scope.BUYER),
                source=Source.RPC,
            ),
            now=now,
        )

    return write


class FakeUserRepository:
    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def find_actor(self, token_hash: str, *, now: datetime) -> Actor | None:
        store = self._uow.store
        token = store.tokens.get(token_hash)
        if token is None or token.revoked_at is not None:
            return None
        if token.expires_at is not None and token.expires_at <= now:
            return None
        user = store.users[token.user_id]
        return Actor(user.user_id, user.email, token.scope, token_expires_at=token.expires_at)

    async def hold(self, user_id: int) -> None:
        # Fake units of work do not run at the same time: only the write is checked.
        self._uow.writable()
        self._uow.factory.held_users.append(user_id)

    async def ensure_user(self, email: str, *, is_staff: bool, now: datetime) -> int:
        store = self._uow.writable()
        for user in store.users.values():
            if user.email == email:
                return user.user_id  # never changed
        return store.add_user(email, is_staff=is_staff).user_id

    async def add_token(
        self,
        user_id: int,
        token_hash: str,
        *,
        scope: Scope,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> bool:
        store = self._uow.writable()
        if token_hash in store.tokens:
            return False
        if user_id not in store.users:
            raise ForeignKeyViolation(f"no user {user_id}")
        store.tokens[token_hash] = TokenRow(user_id, token_hash, Scope(scope), now, expires_at)
        return True

    async def revoke_token(self, token_hash: str, *, now: datetime) -> bool:
        store = self._uow.writable()
        token = store.tokens.get(token_hash)
        if token is None or token.revoked_at is not None:
            return False
        store.tokens[token_hash] = replace(token, revoked_at=now)
        return True

    async def revoke_tokens_of(self, email: str, *, now: datetime) -> int:
        store = self._uow.writable()
        owners = {uid for uid, user in store.users.items() if user.email == email}
        live = [h for h, t in store.tokens.items() if t.user_id in owners and t.revoked_at is None]
        for token_hash in live:
            store.tokens[token_hash] = replace(store.tokens[token_hash], revoked_at=now)
        return len(live)


class FakeCourseRepository:
    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def list_all(self) -> list[Course]:
        return sorted(self._uow.store.courses.values(), key=lambda course: course.slug)

    async def get_by_slug(self, slug: str) -> Course | None:
        return self._uow.store.courses.get(slug)

    async def save(self, *, slug: str, title: str, price: Decimal, currency: str) -> Course:
        store = self._uow.writable()
        existing = store.courses.get(slug)
        pk = existing.pk if existing is not None else store.new_pk()
        course = Course(pk, slug, title, price, currency)
        store.courses[slug] = course
        return course


class FakePurchaseRepository:
    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def add(
        self,
        *,
        purchase_id: str,
        owner_id: int,
        course: Course,
        idempotency_key: str | None,
        now: datetime,
    ) -> Purchase | None:
        self._uow.factory._run_interleaved("purchases.add", self._uow)
        store = self._uow.writable()
        return store.add_purchase(
            purchase_id=purchase_id,
            owner_id=owner_id,
            course=course,
            idempotency_key=idempotency_key,
            now=now,
        )

    async def get(self, purchase_id: str, *, owner_id: int | None) -> Purchase | None:
        row = self._uow.store.purchase_by_id(purchase_id)
        if row is None or (owner_id is not None and row.purchase.owner_id != owner_id):
            return None
        return row.purchase

    async def get_by_idempotency_key(self, owner_id: int, key: str) -> Purchase | None:
        for row in self._uow.store.purchases.values():
            if row.purchase.owner_id == owner_id and row.idempotency_key == key:
                return row.purchase
        return None

    async def list_page(
        self,
        *,
        owner_id: int | None,
        state: PurchaseState | None,
        limit: int,
        before: int | None,
    ) -> list[Purchase]:
        rows = [
            row.purchase
            for row in self._uow.store.purchases.values()
            if (owner_id is None or row.purchase.owner_id == owner_id)
            and (state is None or row.purchase.state is state)
            and (before is None or row.purchase.pk < before)
        ]
        rows.sort(key=lambda purchase: purchase.pk, reverse=True)
        return rows[:limit]

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
        factory = self._uow.factory
        factory.transition_calls.append((pk, sources, target, error_msg, payment_ref))
        factory._run_interleaved("purchases.transition", self._uow)
        store = self._uow.writable()
        if factory.lost_transitions > 0:
            factory.lost_transitions -= 1
            return None
        try:
            changed = store.set_state(
                pk,
                sources=sources,
                target=target,
                error_msg=error_msg,
                now=now,
                payment_ref=payment_ref,
            )
        except UniqueViolation:
            raise PaymentNotVerified(
                "reused", "this payment already fulfilled another purchase"
            ) from None
        if not changed:
            return None
        now_held = store.purchases[pk].purchase
        return StateChange(
            state=now_held.state,
            error_msg=now_held.error_msg,
            updated_at=now_held.updated_at,
            fulfilled_at=now_held.fulfilled_at,
        )

    async def holder_of_payment_ref(self, payment_ref: str) -> int | None:
        return self._uow.store.holder_of(payment_ref)

    async def count_pending(self, owner_id: int) -> int:
        return sum(
            1
            for row in self._uow.store.purchases.values()
            if row.purchase.owner_id == owner_id and row.purchase.state is PurchaseState.PENDING
        )


class FakeRegistrationRepository:
    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def add(self, purchase: Purchase, *, now: datetime) -> None:
        self._uow.writable().add_registration(purchase, now=now)

    async def exists(self, user_id: int, course_pk: int) -> bool:
        return any(
            r.user_id == user_id and r.course_pk == course_pk for r in self._uow.store.registrations
        )

    async def list_page(
        self, user_id: int, *, limit: int, before: int | None
    ) -> list[Registration]:
        rows = [
            r
            for r in self._uow.store.registrations
            if r.user_id == user_id and (before is None or r.pk < before)
        ]
        rows.sort(key=lambda r: r.pk, reverse=True)
        return [
            Registration(r.pk, r.course_slug, r.purchase_id, r.created_at) for r in rows[:limit]
        ]


class FakeReceiptOutboxRepository:
    """The outbox port in memory, statement for statement as ``SqlReceiptOutboxRepository``
    (``tests/unit/outbox_contract.py`` holds both to the same behaviour)."""

    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def add(self, purchase: Purchase, *, now: datetime) -> None:
        self._uow.writable().add_receipt(purchase, now=now)

    async def claim_due(
        self, *, now: datetime, lease_until: datetime, token: str, limit: int
    ) -> list[ReceiptJob]:
        store = self._uow.writable()
        due = sorted(
            (
                row
                for row in store.receipts
                if row.status is OutboxStatus.PENDING and row.next_attempt_at <= now
            ),
            key=lambda row: (row.next_attempt_at, row.pk),
        )[:limit]
        chosen = {row.pk for row in due}
        store.change_receipts(
            lambda row: row.pk in chosen,
            lambda row: replace(
                row, claim_token=token, next_attempt_at=lease_until, attempts=row.attempts + 1
            ),
        )
        claimed = sorted(
            (row for row in store.receipts if row.claim_token == token), key=lambda row: row.pk
        )
        return [self._job(store, row) for row in claimed]

    @staticmethod
    def _job(store: FakeStore, row: ReceiptRow) -> ReceiptJob:
        purchase = store.purchases[row.purchase_pk].purchase
        return ReceiptJob(
            outbox_id=row.pk,
            attempts=row.attempts,
            receipt=Receipt(
                purchase_id=purchase.purchase_id,
                recipient=row.recipient,
                course_title=purchase.course_title,
                amount=purchase.amount,
                currency=purchase.currency,
                fulfilled_at=purchase.fulfilled_at or purchase.updated_at,
            ),
        )

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
        store = self._uow.writable()
        status = OutboxStatus(status)
        if status is OutboxStatus.DEAD:
            next_attempt_at = now
        return bool(
            store.change_receipts(
                lambda row: row.pk == outbox_id and row.claim_token == token,
                lambda row: replace(
                    row,
                    status=status,
                    claim_token=None,
                    sent_at=now if status is OutboxStatus.SENT else row.sent_at,
                    next_attempt_at=(
                        row.next_attempt_at if next_attempt_at is None else next_attempt_at
                    ),
                    last_error=row.last_error if error is None else error[:2000],
                ),
            )
        )

    async def settle_sent(
        self, outbox_ids: Sequence[int], *, token: str, now: datetime
    ) -> set[int]:
        wanted = set(outbox_ids)
        changed = self._uow.writable().change_receipts(
            lambda row: row.pk in wanted and row.claim_token == token,
            lambda row: replace(row, status=OutboxStatus.SENT, claim_token=None, sent_at=now),
        )
        return set(changed)

    async def release(self, token: str, *, now: datetime) -> None:
        self._uow.writable().change_receipts(
            lambda row: row.claim_token == token and row.status is OutboxStatus.PENDING,
            lambda row: replace(
                row, claim_token=None, next_attempt_at=now, attempts=row.attempts - 1
            ),
        )

    async def renew(self, token: str, *, lease_until: datetime) -> None:
        self._uow.writable().change_receipts(
            lambda row: row.claim_token == token and row.status is OutboxStatus.PENDING,
            lambda row: replace(row, next_attempt_at=lease_until),
        )

    async def requeue(self, outbox_id: int, *, now: datetime) -> bool:
        return bool(
            self._uow.writable().change_receipts(
                lambda row: row.pk == outbox_id and row.status is OutboxStatus.DEAD,
                lambda row: replace(
                    row,
                    status=OutboxStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    claim_token=None,
                ),
            )
        )

    async def status_of(self, outbox_id: int) -> OutboxStatus | None:
        for row in self._uow.store.receipts:
            if row.pk == outbox_id:
                return row.status
        return None

    async def overview(self, *, limit: int) -> list[OutboxEntry]:
        store = self._uow.store
        newest = sorted(store.receipts, key=lambda row: row.pk, reverse=True)[:limit]
        return [
            OutboxEntry(
                outbox_id=row.pk,
                purchase_id=store.purchases[row.purchase_pk].purchase.purchase_id,
                recipient=row.recipient,
                status=row.status,
                attempts=row.attempts,
                next_attempt_at=row.next_attempt_at,
                sent_at=row.sent_at,
                last_error=row.last_error,
            )
            for row in newest
        ]

    async def counts(self) -> dict[OutboxStatus, int]:
        counts: dict[OutboxStatus, int] = {}
        for row in self._uow.store.receipts:
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    async def backlog(self) -> ReceiptBacklog:
        rows = self._uow.store.receipts
        pending = [row.created_at for row in rows if row.status is OutboxStatus.PENDING]
        return ReceiptBacklog(
            pending=len(pending),
            dead=sum(1 for row in rows if row.status is OutboxStatus.DEAD),
            oldest_pending_at=min(pending, default=None),
        )


class FakePurchaseEventRepository:
    def __init__(self, uow: FakeUnitOfWork):
        self._uow = uow

    async def append(self, event: NewPurchaseEvent, *, now: datetime) -> int:
        return self._uow.writable().append_event(event, now=now)

    async def list_for(self, purchase_pk: int) -> list[PurchaseEventRecord]:
        store = self._uow.store
        rows = sorted(
            (row for row in store.events if row.purchase_pk == purchase_pk),
            key=lambda row: row.seq,
        )
        return [
            PurchaseEventRecord(
                seq=row.seq,
                purchase_id=store.purchases[row.purchase_pk].purchase.purchase_id,
                from_state=row.from_state,
                to_state=row.to_state,
                actor_user_id=row.actor_user_id,
                actor_email=(
                    None if row.actor_user_id is None else store.users[row.actor_user_id].email
                ),
                actor_scope=row.actor_scope,
                source=row.source,
                backing=row.backing,
                payment_ref=row.payment_ref,
                error_msg=row.error_msg,
                created_at=row.created_at,
            )
            for row in rows
        ]

    async def payment_event_applied(self, event_id: str) -> bool:
        return any(row.payment_event_id == event_id for row in self._uow.store.events)

    async def latest_seq(self) -> int:
        return max((row.seq for row in self._uow.store.events), default=0)

    async def updates_after(
        self, after: int, scope: UpdateScope, *, upto: int | None = None, limit: int
    ) -> list[PurchaseUpdate]:
        store = self._uow.store
        updates = []
        for row in sorted(store.events, key=lambda row: row.seq):
            purchase = store.purchases[row.purchase_pk].purchase
            if row.seq <= after or (upto is not None and row.seq > upto):
                continue
            if not scope.covers(purchase):
                continue
            [event] = [e for e in await self.list_for(row.purchase_pk) if e.seq == row.seq]
            updates.append(PurchaseUpdate(event=event, purchase=purchase))
        return updates[:limit]


class FakeUnitOfWork:
    """One fake transaction: a private copy of the store, published only by ``commit``."""

    def __init__(self, factory: FakeUnitOfWorkFactory, *, write: bool):
        self.factory = factory
        self.write = write
        self.committed = False
        self._store: FakeStore | None = None
        self.users = FakeUserRepository(self)
        self.courses = FakeCourseRepository(self)
        self.purchases = FakePurchaseRepository(self)
        self.registrations = FakeRegistrationRepository(self)
        self.receipts = FakeReceiptOutboxRepository(self)
        self.events = FakePurchaseEventRepository(self)

    @property
    def store(self) -> FakeStore:
        assert self._store is not None, "unit of work used outside 'async with'"
        return self._store

    def writable(self) -> FakeStore:
        if not self.write:
            raise ReadOnlyUnitOfWork("write in a unit of work opened without write=True")
        return self.store

    async def __aenter__(self) -> Self:
        assert self._store is None, "a unit of work is entered once"
        self._store = self.factory.committed.clone()
        self.factory.open_units.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.factory.open_units.remove(self)
        if not self.committed:
            self.factory.rollbacks += 1
        self._store = None  # discard whatever was not committed

    async def commit(self) -> None:
        self.writable()
        self.factory.committed = self.store.clone()
        self.factory.commits += 1
        self.committed = True


# One ``purchases.transition`` call: pk, sources, target, error_msg, payment_ref.
TransitionCall = tuple[int, frozenset[PurchaseState], PurchaseState, str | None, str | None]


class FakeUnitOfWorkFactory:
    """``factory(write=False)`` -> a new ``FakeUnitOfWork``; also the test's view of the data."""

    def __init__(self) -> None:
        self.committed = FakeStore()
        self.commits = 0
        self.rollbacks = 0
        self.opened: list[bool] = []  # the ``write`` flag of each unit of work made
        self.open_units: list[FakeUnitOfWork] = []
        self.transition_calls: list[TransitionCall] = []
        self.lost_transitions = 0
        self.held_users: list[int] = []  # the users whose row a unit of work held
        self._interleaved: dict[str, list[Writer]] = {}

    def __call__(self, *, write: bool = False) -> FakeUnitOfWork:
        self.opened.append(write)
        return FakeUnitOfWork(self, write=write)

    def expect_purchase(self, purchase_id: str) -> None:
        """A hint the fake has no use for: it reads nothing ahead."""

    # Concurrency.

    def interleave(self, before: str, writer: Writer) -> None:
        """Commit ``writer``'s change just before the next ``before`` repository call.

        ``before`` is ``"purchases.transition"`` or ``"purchases.add"``. The change is
        committed (so it survives whatever the unit of work under test does) and seen by
        that unit of work from then on, as a statement sees rows committed before it.
        """
        self._interleaved.setdefault(before, []).append(writer)

    def lose_next_transitions(self, count: int = 1) -> None:
        """Make the next ``count`` transitions report False and change nothing."""
        self.lost_transitions += count

    def _run_interleaved(self, call: str, uow: FakeUnitOfWork) -> None:
        writers = self._interleaved.pop(call, [])
        for writer in writers:
            writer(self.committed)
            writer(uow.store)

    # Seeding and reading committed rows, outside any unit of work.

    def add_user(self, email: str, *, scope: Scope = Scope.BUYER) -> Actor:
        """A user (staff by role if ``scope`` is staff) and the actor of a token of
        ``scope`` for it (store the token with ``add_token``)."""
        user = self.committed.add_user(email, is_staff=scope is Scope.STAFF)
        return Actor(user.user_id, email, scope)

    def add_course(
        self, slug: str, title: str, price: str | Decimal, currency: str = "USD"
    ) -> Course:
        course = Course(self.committed.new_pk(), slug, title, Decimal(price), currency)
        self.committed.courses[slug] = course
        return course

    def add_token(self, actor: Actor, token: str) -> str:
        """Store ``token`` for the actor's user, of the actor's scope."""
        token_hash = hash_token(token)
        self.committed.tokens[token_hash] = TokenRow(
            actor.user_id, token_hash, actor.scope, FixedClock()()
        )
        return token

    def purchase(self, purchase_id: str) -> Purchase:
        row = self.committed.purchase_by_id(purchase_id)
        assert row is not None, f"no committed purchase {purchase_id}"
        return row.purchase

    def payment_ref_of(self, purchase_id: str) -> str | None:
        row = self.committed.purchase_by_id(purchase_id)
        assert row is not None, f"no committed purchase {purchase_id}"
        return row.payment_ref

    @property
    def purchases(self) -> list[Purchase]:
        return [row.purchase for row in self.committed.purchases.values()]

    @property
    def registrations(self) -> list[RegistrationRow]:
        return list(self.committed.registrations)

    @property
    def receipts(self) -> list[ReceiptRow]:
        return list(self.committed.receipts)

    @property
    def events(self) -> list[EventRow]:
        """Every committed audit event, in sequence order."""
        return sorted(self.committed.events, key=lambda row: row.seq)

    def events_of(self, purchase_id: str) -> list[EventRow]:
        pk = self.purchase(purchase_id).pk
        return [row for row in self.events if row.purchase_pk == pk]

    @property
    def tokens(self) -> dict[str, TokenRow]:
        return dict(self.committed.tokens)

    @property
    def users(self) -> dict[int, UserRow]:
        return dict(self.committed.users)


def as_port(factory: FakeUnitOfWorkFactory) -> UnitOfWorkFactory:
    """The fake factory as the port it stands in for. Nothing needs to call it: mypy
    checking this file checks that every fake has its port's whole shape
    (``test_outbox_port.test_the_fakes_type_check_as_the_ports`` runs it)."""
    return factory
