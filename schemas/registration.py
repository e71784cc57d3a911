"""registration.list.

Called without params it answers a bare array, the shape it answered before it took
any (the newest ``BARE_LIST_LIMIT`` registrations); with ``limit`` or ``cursor`` it
answers a page ``{items, next_cursor}`` as ``purchase.list`` does.
"""

from marshmallow import fields, validate

from schemas.base import Out, Params
from schemas.fields import Cursor

# At most this many registrations in the bare array of a call without params.
BARE_LIST_LIMIT = 100


class RegistrationListParams(Params):
    limit = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=100),
        metadata={
            "description": "Page size (default 20). With limit or cursor the answer is a "
            "page {items, next_cursor}; without params, a bare array of the newest "
            f"{BARE_LIST_LIMIT} registrations."
        },
    )
    cursor = Cursor(metadata={"description": "next_cursor of the previous page."})


class RegistrationOut(Out):
    course = fields.String(attribute="course_slug")
    purchase_id = fields.String()
    created_at = fields.DateTime()


class RegistrationPageOut(Out):
    items = fields.List(fields.Nested(RegistrationOut))
    next_cursor = Cursor(attribute="next_before", allow_none=True)
