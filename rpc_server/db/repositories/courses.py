"""The course catalogue."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from models import Course as CourseRow
from rpc_server.db.repositories.rows import UnitOfWorkConnection
from rpc_server.domain.records import Course

_COURSE_COLUMNS = (
    CourseRow.id,
    CourseRow.slug,
    CourseRow.title,
    CourseRow.price,
    CourseRow.currency,
)
_ALL_COURSES = select(*_COURSE_COLUMNS).order_by(CourseRow.slug)
_COURSE_BY_SLUG = select(*_COURSE_COLUMNS).where(CourseRow.slug == bindparam("slug"))
_COURSE_ID_BY_SLUG = select(CourseRow.id).where(CourseRow.slug == bindparam("slug"))
_INSERT_COURSE = insert(CourseRow).returning(CourseRow.id)
_UPDATE_COURSE = (
    update(CourseRow)
    .where(CourseRow.id == bindparam("pk"))
    .values(
        title=bindparam("new_title"),
        price=bindparam("new_price"),
        currency=bindparam("new_currency"),
    )
)


def _course(row: Sequence[Any]) -> Course:
    pk, slug, title, price, currency = row
    return Course(pk, slug, title, price, currency)


class SqlCourseRepository:
    def __init__(self, connection: UnitOfWorkConnection):
        self.connection = connection

    async def list_all(self) -> list[Course]:
        return [_course(row) for row in await self.connection.execute(_ALL_COURSES)]

    async def get_by_slug(self, slug: str) -> Course | None:
        row = (await self.connection.execute(_COURSE_BY_SLUG, {"slug": slug})).first()
        return None if row is None else _course(row)

    async def save(self, *, slug: str, title: str, price: Decimal, currency: str) -> Course:
        pk = await self.connection.scalar(_COURSE_ID_BY_SLUG, {"slug": slug})
        if pk is None:
            pk = await self.connection.scalar(
                _INSERT_COURSE,
                {"slug": slug, "title": title, "price": price, "currency": currency},
            )
        else:
            await self.connection.execute(
                _UPDATE_COURSE,
                {"pk": pk, "new_title": title, "new_price": price, "new_currency": currency},
            )
        assert pk is not None
        return Course(pk, slug, title, price, currency)
