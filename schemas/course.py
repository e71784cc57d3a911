"""course.list."""

from decimal import Decimal, InvalidOperation
from typing import NoReturn

from marshmallow import ValidationError, fields, validate

from schemas.base import Out, Params


def _raise(message: str) -> NoReturn:
    raise ValidationError(message)


def _cents(price: Decimal) -> None:
    """Reject rather than round: 1.234 is a typo, not a price."""
    try:
        cents = price.quantize(Decimal("0.01"))
    except InvalidOperation:  # too many digits to count in cents: the Range check says so
        return
    if price != cents:
        raise ValidationError("Use at most two decimal places.")


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
            r"^[a-z0-9][a-z0-9-]{0,99}\Z", error="Use lowercase letters, digits and dashes."
        ),
    )
    title = fields.String(
        required=True,
        validate=[
            validate.Length(min=1, max=200),
            # It becomes an email Subject: no line breaks or other control characters.
            validate.Regexp(r"^[^\x00-\x1f\x7f]*\Z", error="Use one line of text."),
        ],
    )
    price = fields.Decimal(
        required=True,
        allow_nan=False,
        validate=[validate.Range(min=0, max=Decimal("9999999999.99")), _cents],
    )
    currency = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Z]{3}\Z", error="Use a three-letter ISO 4217 code."),
    )
