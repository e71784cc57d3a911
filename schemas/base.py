"""The two bases: ``Params`` for inputs (write-only) and ``Out`` for outputs (read-only)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema
from marshmallow.fields import Field


class Params(Schema):
    """Input of a method: every field ``load_only``; unknown fields are errors."""

    class Meta:
        unknown = RAISE

    def on_bind_field(self, field_name: str, field_obj: Field[Any]) -> None:
        field_obj.load_only = True


class Out(Schema):
    """Output of a method: every field ``dump_only``, so it can never be loaded.

    Every field is also marked required: an answer always carries all of them (``null``
    where there is no value), which is what the OpenRPC document then promises.
    """

    def on_bind_field(self, field_name: str, field_obj: Field[Any]) -> None:
        field_obj.dump_only = True
        field_obj.required = True
