"""The audit trail of purchase state changes (``purchase_events``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, func, insert, select, update
from sqlalchemy.orm import aliased

from models import Course as CourseRow
from models import EventSequence as EventSequenceRow
from models import Purchase as PurchaseRow
from models import PurchaseEvent as PurchaseEventRow
from models import User as UserRow
from rpc_server.db.repositories.purchases import PURCHASE_COLUMNS, purchase_from_row
from rpc_server.db.repositories.rows import UnitOfWorkConnection, as_utc
from rpc_server.domain.records import (
    Backing,
    NewPurchaseEvent,
    PurchaseEventRecord,
    PurchaseUpdate,
    Source,
    UpdateScope,
)
from rpc_server.domain.states import PurchaseState, Scope

# A committed state change as the metrics count it: (from state or None, to state).
Transition = tuple[str | None, str]

# An event's values, bound by name (its seq comes from ``event_sequence``).
_EVENT_COLUMNS = (
    "purchase_id", "from_state", "to_state", "actor_user_id", "actor_scope", "source",
    "evidence", "payment_event_id", "payment_ref", "error_msg", "created_at",
)  # fmt: skip
_EVENT_VALUES = [
    bindparam(name, type_=PurchaseEventRow.__table__.c[name].type) for name in _EVENT_COLUMNS
]
# The event's row, numbered in the same statement with the next sequence number
# (models.EventSequence), one trip to the database:
# - PostgreSQL: the sequence's UPDATE in a WITH, the INSERT from what it returns. Its row
#   lock is held until the transaction ends, which is what makes numbers follow commit
#   order.
# - SQLite (no UPDATE inside a WITH): the INSERT reads ``last_seq + 1`` and the trigger
#   ``purchase_events_sequence`` (migration 0009) moves ``last_seq`` to the row's seq, in
#   the same statement; SQLite's writers are serialized.
_TAKE_SEQ = (
    update(EventSequenceRow)
    .where(EventSequenceRow.id == 1)
    .values(last_seq=EventSequenceRow.last_seq + 1)
    .returning(EventSequenceRow.last_seq)
    .cte("next_seq")
)
_APPEND_EVENT = {
    "postgresql": insert(PurchaseEventRow)
    .from_select(["seq", *_EVENT_COLUMNS], select(_TAKE_SEQ.c.last_seq, *_EVENT_VALUES))
    .add_cte(_TAKE_SEQ)
    .returning(PurchaseEventRow.seq),
    "sqlite": insert(PurchaseEventRow)
    .from_select(
        ["seq", *_EVENT_COLUMNS],
        select(EventSequenceRow.last_seq + 1, *_EVENT_VALUES).where(EventSequenceRow.id == 1),
    )
    .returning(PurchaseEventRow.seq),
}
_EVENTS_OF_PURCHASE = (
    select(
        PurchaseEventRow.seq,
        PurchaseRow.purchase_id,
        PurchaseEventRow.from_state,
        PurchaseEventRow.to_state,
        PurchaseEventRow.actor_user_id,
        UserRow.email,
        PurchaseEventRow.actor_scope,
        PurchaseEventRow.source,
        PurchaseEventRow.evidence,
        PurchaseEventRow.payment_ref,
        PurchaseEventRow.error_msg,
        PurchaseEventRow.created_at,
    )
    .join(PurchaseRow, PurchaseRow.id == PurchaseEventRow.purchase_id)
    .outerjoin(UserRow, UserRow.id == PurchaseEventRow.actor_user_id)
    .where(PurchaseEventRow.purchase_id == bindparam("purchase_pk"))
    .order_by(PurchaseEventRow.seq)
)
_LATEST_SEQ = select(func.coalesce(func.max(PurchaseEventRow.seq), 0))
_EVENT_ACTOR = aliased(UserRow, name="actor")
_UPDATE_COLUMNS = (
    PurchaseEventRow.seq,
    PurchaseRow.purchase_id,
    PurchaseEventRow.from_state,
    PurchaseEventRow.to_state,
    PurchaseEventRow.actor_user_id,
    _EVENT_ACTOR.email,
    PurchaseEventRow.actor_scope,
    PurchaseEventRow.source,
    PurchaseEventRow.evidence,
    PurchaseEventRow.payment_ref,
    PurchaseEventRow.error_msg,
    PurchaseEventRow.created_at,
    *PURCHASE_COLUMNS,
)
_EVENT_OF_PAYMENT = (
    select(PurchaseEventRow.seq)
    .where(PurchaseEventRow.payment_event_id == bindparam("event_id"))
    .limit(1)
)


@functools.cache
def _updates_query(*, bounded: bool, of_owner: bool, of_purchase: bool) -> Select[*tuple[Any, ...]]:
    """Events after ``:after`` (and up to ``:upto`` when ``bounded``), joined to their
    purchase as ``purchase.get`` reads it, in sequence order; one statement per shape.

    Walked on the primary key from ``:after`` (the events a subscriber has not seen yet
    are the newest ones); one purchase's on ``(purchase_id, seq)``.
    """
    query: Select[*tuple[Any, ...]] = (
        select(*_UPDATE_COLUMNS)
        .select_from(PurchaseEventRow)
        .join(PurchaseRow, PurchaseRow.id == PurchaseEventRow.purchase_id)
        .join(UserRow, UserRow.id == PurchaseRow.owner_id)
        .join(CourseRow, CourseRow.id == PurchaseRow.course_id)
        .outerjoin(_EVENT_ACTOR, _EVENT_ACTOR.id == PurchaseEventRow.actor_user_id)
        .where(PurchaseEventRow.seq > bindparam("after"))
        .order_by(PurchaseEventRow.seq)
        .limit(bindparam("limit"))
    )
    if bounded:
        query = query.where(PurchaseEventRow.seq <= bindparam("upto"))
    if of_purchase:
        query = query.where(PurchaseEventRow.purchase_id == bindparam("purchase_pk"))
    elif of_owner:
        query = query.where(PurchaseRow.owner_id == bindparam("owner_id"))
    return query


def _event_record(row: Sequence[Any]) -> PurchaseEventRecord:
    """An event from the columns of ``_EVENTS_OF_PURCHASE`` (``_UPDATE_COLUMNS`` begin so)."""
    (seq, purchase_id, from_state, to_state, actor_user_id, email, scope, source, evidence,
     payment_ref, error_msg, created_at) = row  # fmt: skip
    return PurchaseEventRecord(
        seq=seq,
        purchase_id=purchase_id,
        from_state=None if from_state is None else PurchaseState(from_state),
        to_state=PurchaseState(to_state),
        actor_user_id=actor_user_id,
        actor_email=email,
        actor_scope=None if scope is None else Scope(scope),
        source=Source(source),
        backing=None if evidence is None else Backing(evidence),
        payment_ref=payment_ref,
        error_msg=error_msg,
        created_at=as_utc(created_at),
    )


def _update_from_row(row: Sequence[Any]) -> PurchaseUpdate:
    return PurchaseUpdate(event=_event_record(row[:12]), purchase=purchase_from_row(row[12:]))


class SqlPurchaseEventRepository:
    """The audit trail of purchase state changes (``purchase_events``)."""

    def __init__(self, connection: UnitOfWorkConnection):
        self.connection = connection
        # The state changes (from, to) of the events this unit of work appended: counted
        # once committed, and its commit wakes the live feed if there are any.
        self.transitions: list[Transition] = []

    @property
    def appended(self) -> bool:
        """Whether this unit of work appended an event."""
        return bool(self.transitions)

    async def append(self, event: NewPurchaseEvent, *, now: datetime) -> int:
        seq = await self.connection.scalar(
            _APPEND_EVENT[self.connection.dialect_name],
            {
                "purchase_id": event.purchase_pk,
                "from_state": None if event.from_state is None else event.from_state.value,
                "to_state": event.to_state.value,
                "actor_user_id": event.actor.user_id,
                "actor_scope": None if event.actor.scope is None else event.actor.scope.value,
                "source": event.source.value,
                "evidence": None if event.backing is None else event.backing.value,
                "payment_event_id": event.payment_event_id,
                "payment_ref": event.payment_ref,
                "error_msg": event.error_msg,
                "created_at": now,
            },
        )
        assert seq is not None, "event_sequence has no row: run rpc-server migrate"
        self.transitions.append(
            (None if event.from_state is None else event.from_state.value, event.to_state.value)
        )
        return int(seq)

    async def list_for(self, purchase_pk: int) -> list[PurchaseEventRecord]:
        rows = await self.connection.execute(_EVENTS_OF_PURCHASE, {"purchase_pk": purchase_pk})
        return [_event_record(row) for row in rows]

    async def payment_event_applied(self, event_id: str) -> bool:
        found = await self.connection.scalar(_EVENT_OF_PAYMENT, {"event_id": event_id})
        return found is not None

    async def latest_seq(self) -> int:
        return int(await self.connection.scalar(_LATEST_SEQ) or 0)

    async def updates_after(
        self, after: int, scope: UpdateScope, *, upto: int | None = None, limit: int
    ) -> list[PurchaseUpdate]:
        query = _updates_query(
            bounded=upto is not None,
            of_owner=scope.owner_id is not None,
            of_purchase=scope.purchase_pk is not None,
        )
        params: dict[str, Any] = {"after": after, "limit": limit}
        if upto is not None:
            params["upto"] = upto
        if scope.purchase_pk is not None:
            params["purchase_pk"] = scope.purchase_pk
        elif scope.owner_id is not None:
            params["owner_id"] = scope.owner_id
        rows = await self.connection.execute(query, params)
        return [_update_from_row(row) for row in rows]
