"""registration.list."""

from marshmallow import fields

from schemas.base import Out, Params


class RegistrationListParams(Params):
    """registration.list takes no params."""


class RegistrationOut(Out):
    course = fields.String(attribute="course_slug")
    purchase_id = fields.String()
    created_at = fields.DateTime()
