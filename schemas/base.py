"""The two bases: ``Params`` for inputs (write-only) and ``Out`` for outputs (read-only)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields
from marshmallow.fields import Field


def _no_nul(value: str) -> None:
    # PostgreSQL cannot store NUL in text, and no identifier or message needs one.
    if "\x00" in value:
        raise ValidationError("Must not contain NUL characters.")


class Params(Schema):
    """Input of a method: every field ``load_only``; unknown fields are errors; no text
    field accepts a NUL character."""

    class Meta:
        unknown = RAISE

    def on_bind_field(self, field_name: str, field_obj: Field[Any]) -> None:
        field_obj.load_only = True
        if isinstance(field_obj, fields.String) and _no_nul not in field_obj.validators:
            field_obj.validators.append(_no_nul)


class Out(Schema):
    """Output of a method: every field ``dump_only``, so it can never be loaded.

    Every field is also marked required: an answer always carries all of them (``null``
    where there is no value), which is what the OpenRPC document then promises.
    """

    def on_bind_field(self, field_name: str, field_obj: Field[Any]) -> None:
        field_obj.dump_only = True
        field_obj.required = True
