"""course.list."""

from marshmallow import fields, validate

from schemas.base import Out, Params


class CourseListParams(Params):
    """course.list takes no params."""


class CourseOut(Out):
    slug = fields.String()
    title = fields.String()
    price = fields.Decimal(as_string=True, places=2)
    currency = fields.String()


class CourseSaveParams(Params):
    """What an operator gives to create or update a course (``rpc-server create-course``)."""

    slug = fields.String(
        required=True,
        validate=validate.Regexp(
            r"^[a-z0-9][a-z0-9-]{0,99}$", error="Use lowercase letters, digits and dashes."
        ),
    )
    title = fields.String(required=True, validate=validate.Length(min=1, max=200))
    price = fields.Decimal(required=True, places=2, validate=validate.Range(min=0), allow_nan=False)
    currency = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Z]{3}$", error="Use a three-letter ISO 4217 code."),
    )
