"""Purchases: reads (one, several, a page) and their state transitions."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Select,
    Update,
    bindparam,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from models import Course as CourseRow
from models import Purchase as PurchaseRow
from models import User as UserRow
from models.tables import PENDING_ONLY
from rpc_server.db.coalescing import PurchaseLookups
from rpc_server.db.repositories.rows import (
    UnitOfWorkConnection,
    as_utc,
    id_binds,
    id_chunks,
)
from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.records import Course, Purchase, StateChange
from rpc_server.domain.states import PurchaseState

PURCHASE_COLUMNS = (
    PurchaseRow.id,
    PurchaseRow.purchase_id,
    PurchaseRow.owner_id,
    UserRow.email,
    PurchaseRow.course_id,
    CourseRow.slug,
    CourseRow.title,
    PurchaseRow.amount,
    PurchaseRow.currency,
    PurchaseRow.state,
    PurchaseRow.error_msg,
    PurchaseRow.created_at,
    PurchaseRow.updated_at,
    PurchaseRow.fulfilled_at,
)


# Built once: every purchase read is this statement with some conditions.
_PURCHASE_QUERY: Select[*tuple[Any, ...]] = (
    select(*PURCHASE_COLUMNS)
    .join(UserRow, UserRow.id == PurchaseRow.owner_id)
    .join(CourseRow, CourseRow.id == PurchaseRow.course_id)
)
_PURCHASE_BY_ID = _PURCHASE_QUERY.where(PurchaseRow.purchase_id == bindparam("purchase_id"))
_OWN_PURCHASE_BY_ID = _PURCHASE_BY_ID.where(PurchaseRow.owner_id == bindparam("owner_id"))
_PURCHASE_BY_IDEMPOTENCY_KEY = _PURCHASE_QUERY.where(
    PurchaseRow.owner_id == bindparam("owner_id"),
    PurchaseRow.idempotency_key == bindparam("idempotency_key"),
)


@functools.cache
def _purchases_by_ids(count: int) -> Select[*tuple[Any, ...]]:
    """Purchases whose id is one of ``count`` bound ids (``id_0`` …), whoever owns them.

    The owner is checked on the rows read (``get_many``), not in the statement: with
    ``AND owner_id = ?`` SQLite, which keeps no statistics unless ANALYZE is run, plans
    the read on the ``(owner_id, id)`` index and walks every purchase of the caller
    (2 ms for 10,000 of them, against 0.06 ms on the unique ``purchase_id`` index). By
    id alone, both engines read the unique index, whatever the caller owns; a foreign
    row costs one of at most ``IDS_PER_STATEMENT`` rows read and is never answered.

    One statement per count (at most IDS_PER_STATEMENT), each built and compiled once,
    like the other statements here.
    """
    return _PURCHASE_QUERY.where(PurchaseRow.purchase_id.in_(id_binds(count)))


_PURCHASE_BY_PAYMENT_REF = select(PurchaseRow.id).where(
    PurchaseRow.payment_ref == bindparam("payment_ref")
)
_INSERT_PURCHASE = insert(PurchaseRow)


@functools.cache
def _page_query(*, of_owner: bool, in_state: bool, before: bool) -> Select[*tuple[Any, ...]]:
    """The ``purchase.list`` statement for one combination of conditions (8 in all)."""
    if of_owner:
        # The (owner_id, id) index holds one owner's purchases in page order. With
        # "owner_id = :owner_id" PostgreSQL treats owner_id as a constant, drops it from the
        # ORDER BY, and for an owner with most of the table walks the primary key
        # backwards instead, past every newer purchase of other users (7.5 ms instead of
        # 0.3 ms for a first page, measured with 1M purchases behind 50k newer ones).
        # For the first page the same condition is written as a range: owner_id stays in
        # the order, which only the composite index delivers without a sort. Later pages
        # keep the equality: below a cursor the primary key's range is a fine path too.
        # With a state, (owner_id, state, id) holds the page in order under the equality,
        # on both engines; a range on owner_id would keep SQLite from using state in it.
        owner = (
            PurchaseRow.owner_id == bindparam("owner_id")
            if before or in_state
            else PurchaseRow.owner_id.between(bindparam("owner_id"), bindparam("owner_id"))
        )
        query = _PURCHASE_QUERY.where(owner).order_by(
            PurchaseRow.owner_id.desc(), PurchaseRow.id.desc()
        )
    else:
        query = _PURCHASE_QUERY.order_by(PurchaseRow.id.desc())
    if in_state:
        query = query.where(PurchaseRow.state == bindparam("state"))
    if before:
        query = query.where(PurchaseRow.id < bindparam("before"))
    return query.limit(bindparam("limit"))


@functools.cache
def _transition_statement(sources: frozenset[PurchaseState], target: PurchaseState) -> Update:
    """``UPDATE purchases … WHERE id = :pk AND state IN (sources) RETURNING`` the
    columns it changes."""
    values: dict[str, Any] = {
        "state": target.value,
        "error_msg": bindparam("new_error_msg"),
        "updated_at": bindparam("now"),
    }
    if target is PurchaseState.FULFILLED:
        values["fulfilled_at"] = bindparam("now")
        values["payment_ref"] = bindparam("payment_ref")
    return (
        update(PurchaseRow)
        .where(
            PurchaseRow.id == bindparam("pk"),
            # One bound value per state ("IN (?, ?)"), not an expanding list: the
            # statement compiles once, with its states bound in it.
            PurchaseRow.state.in_([literal(s.value) for s in sorted(sources)]),
        )
        .values(**values)
        .returning(*_CHANGED_COLUMNS)
    )


# What a transition changes, as ``StateChange`` holds it.
_CHANGED_COLUMNS = (
    PurchaseRow.state,
    PurchaseRow.error_msg,
    PurchaseRow.updated_at,
    PurchaseRow.fulfilled_at,
)


def purchase_from_row(row: Sequence[Any]) -> Purchase:
    (pk, purchase_id, owner_id, email, course_pk, slug, title, amount, currency,
     state, error_msg, created_at, updated_at, fulfilled_at) = row  # fmt: skip
    return Purchase(
        pk=pk,
        purchase_id=purchase_id,
        owner_id=owner_id,
        owner_email=email,
        course_pk=course_pk,
        course_slug=slug,
        course_title=title,
        amount=amount,
        currency=currency,
        state=PurchaseState(state),
        error_msg=error_msg,
        created_at=as_utc(created_at),
        updated_at=as_utc(updated_at),
        fulfilled_at=None if fulfilled_at is None else as_utc(fulfilled_at),
    )


class SqlPurchaseRepository:
    def __init__(self, connection: UnitOfWorkConnection, lookups: PurchaseLookups | None = None):
        """``lookups``: where ``get`` reads instead, coalesced with other calls' (only
        for a read unit of work: ``rpc_server.db.coalescing``)."""
        self.connection = connection
        self._lookups = lookups

    async def _one(
        self, query: Select[*tuple[Any, ...]], params: dict[str, Any]
    ) -> Purchase | None:
        row = (await self.connection.execute(query, params)).first()
        return None if row is None else purchase_from_row(row)

    async def add(
        self,
        *,
        purchase_id: str,
        owner_id: int,
        course: Course,
        idempotency_key: str | None,
        now: datetime,
    ) -> Purchase | None:
        row = {
            "purchase_id": purchase_id,
            "owner_id": owner_id,
            "course_id": course.pk,
            "amount": course.price,
            "currency": course.currency,
            "state": PurchaseState.PENDING.value,
            "idempotency_key": idempotency_key,
            "created_at": now,
            "updated_at": now,
        }
        try:
            # A savepoint, so that losing an idempotency-key race leaves the
            # transaction usable for reading the winner's purchase.
            async with self.connection.begin_nested():
                await self.connection.execute(_INSERT_PURCHASE, row)
        except IntegrityError:
            if idempotency_key is None:
                raise
            return None
        return await self.get(purchase_id, owner_id=owner_id)

    async def get(self, purchase_id: str, *, owner_id: int | None) -> Purchase | None:
        if self._lookups is not None:
            return await self._lookups.get(purchase_id, owner_id)
        if owner_id is None:
            return await self._one(_PURCHASE_BY_ID, {"purchase_id": purchase_id})
        return await self._one(
            _OWN_PURCHASE_BY_ID, {"purchase_id": purchase_id, "owner_id": owner_id}
        )

    async def get_many(
        self, purchase_ids: Sequence[str], *, owner_id: int | None
    ) -> dict[str, Purchase]:
        """The purchases among ``purchase_ids`` (only ``owner_id``'s unless None), by id."""
        found: dict[str, Purchase] = {}
        for count, params in id_chunks(purchase_ids):
            for row in await self.connection.execute(_purchases_by_ids(count), params):
                purchase = purchase_from_row(row)
                if owner_id is None or purchase.owner_id == owner_id:
                    found[purchase.purchase_id] = purchase
        return found

    async def get_by_idempotency_key(self, owner_id: int, key: str) -> Purchase | None:
        return await self._one(
            _PURCHASE_BY_IDEMPOTENCY_KEY, {"owner_id": owner_id, "idempotency_key": key}
        )

    async def list_page(
        self,
        *,
        owner_id: int | None,
        state: PurchaseState | None,
        limit: int,
        before: int | None,
    ) -> list[Purchase]:
        query = _page_query(
            of_owner=owner_id is not None, in_state=state is not None, before=before is not None
        )
        params: dict[str, Any] = {"limit": limit}
        if owner_id is not None:
            params["owner_id"] = owner_id
        if state is not None:
            params["state"] = state.value
        if before is not None:
            params["before"] = before
        return [purchase_from_row(row) for row in await self.connection.execute(query, params)]

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
        params: dict[str, Any] = {"pk": pk, "new_error_msg": error_msg, "now": now}
        if target is PurchaseState.FULFILLED:
            params["payment_ref"] = payment_ref
        try:
            result = await self.connection.execute(_transition_statement(sources, target), params)
        except IntegrityError:
            # Only UNIQUE (payment_ref) can fail here: another purchase was fulfilled
            # with this payment since the caller checked (on PostgreSQL; SQLite's
            # writers are serialized).
            if payment_ref is None:
                raise
            raise PaymentNotVerified(
                "reused", "this payment already fulfilled another purchase"
            ) from None
        row = result.first()
        if row is None:
            return None
        state, new_error_msg, updated_at, fulfilled_at = row
        return StateChange(
            state=PurchaseState(state),
            error_msg=new_error_msg,
            updated_at=as_utc(updated_at),
            fulfilled_at=None if fulfilled_at is None else as_utc(fulfilled_at),
        )

    async def holder_of_payment_ref(self, payment_ref: str) -> int | None:
        pk = await self.connection.scalar(_PURCHASE_BY_PAYMENT_REF, {"payment_ref": payment_ref})
        return None if pk is None else int(pk)

    async def count_pending(self, owner_id: int) -> int:
        return int(await self.connection.scalar(_PENDING_OF_OWNER, {"owner_id": owner_id}) or 0)


# On the partial index of open purchases: its condition is written out as it is in the
# index (a bound 'pending' would not let either engine use it).
_PENDING_OF_OWNER = (
    select(func.count())
    .select_from(PurchaseRow)
    .where(PurchaseRow.owner_id == bindparam("owner_id"), text(PENDING_ONLY))
)
