"""Course registrations: one per fulfilled purchase."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, insert, select

from models import Course as CourseRow
from models import CourseRegistration as RegistrationRow
from models import Purchase as PurchaseRow
from rpc_server.db.repositories.rows import UnitOfWorkConnection, as_utc
from rpc_server.domain.records import Purchase, Registration

_INSERT_REGISTRATION = insert(RegistrationRow)
_REGISTRATION_OF_USER_FOR_COURSE = (
    select(RegistrationRow.id)
    .where(
        RegistrationRow.user_id == bindparam("user_id"),
        RegistrationRow.course_id == bindparam("course_id"),
    )
    .limit(1)
)


class SqlRegistrationRepository:
    def __init__(self, connection: UnitOfWorkConnection):
        self.connection = connection

    async def add(self, purchase: Purchase, *, now: datetime) -> None:
        await self.connection.execute(
            _INSERT_REGISTRATION,
            {
                "purchase_id": purchase.pk,
                "user_id": purchase.owner_id,
                "course_id": purchase.course_pk,
                "created_at": now,
            },
        )

    async def exists(self, user_id: int, course_pk: int) -> bool:
        found = await self.connection.scalar(
            _REGISTRATION_OF_USER_FOR_COURSE, {"user_id": user_id, "course_id": course_pk}
        )
        return found is not None

    async def list_page(
        self, user_id: int, *, limit: int, before: int | None
    ) -> list[Registration]:
        params: dict[str, Any] = {"user_id": user_id, "limit": limit}
        if before is not None:
            params["before"] = before
        rows = await self.connection.execute(
            registration_page_query(before=before is not None), params
        )
        return [Registration(pk, slug, pid, as_utc(created)) for pk, slug, pid, created in rows]


@functools.cache
def registration_page_query(*, before: bool) -> Select[*tuple[Any, ...]]:
    """The ``registration.list`` statement, on the ``(user_id, id)`` index (newest first)."""
    query = (
        select(RegistrationRow.id, CourseRow.slug, PurchaseRow.purchase_id,
               RegistrationRow.created_at)
        .join(CourseRow, CourseRow.id == RegistrationRow.course_id)
        .join(PurchaseRow, PurchaseRow.id == RegistrationRow.purchase_id)
        .order_by(RegistrationRow.user_id.desc(), RegistrationRow.id.desc())
    )  # fmt: skip
    # As for purchase.list's first page (purchases._page_query): a range keeps user_id in
    # the order, which only (user_id, id) delivers, not the primary key walked backwards
    # past every newer registration of other users.
    if before:
        query = query.where(
            RegistrationRow.user_id == bindparam("user_id"),
            RegistrationRow.id < bindparam("before"),
        )
    else:
        query = query.where(
            RegistrationRow.user_id.between(bindparam("user_id"), bindparam("user_id"))
        )
    return query.limit(bindparam("limit"))
