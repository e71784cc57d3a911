"""Custom fields: the opaque page cursor."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from marshmallow import fields

_KEYSET = re.compile(r"p([0-9]{1,19})")
MAX_ROW_NUMBER = 2**63 - 1  # row numbers are 64-bit integers on every engine


class Cursor(fields.Field[int]):
    """An opaque page cursor; inside, the keyset (an internal row number) to continue before.

    Opaque so clients cannot build or depend on it; it is not a secret (it only ever
    selects among rows the caller may see: purchases, registrations).
    """

    default_error_messages = {"invalid": "Not a valid cursor: pass next_cursor unchanged."}  # noqa: RUF012

    def _serialize(
        self, value: int | None, attr: str | None, obj: Any, **kwargs: Any
    ) -> str | None:
        if value is None:
            return None
        return base64.urlsafe_b64encode(f"p{value}".encode()).decode().rstrip("=")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or len(value) > 64:
            raise self.make_error("invalid")
        try:
            decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise self.make_error("invalid") from None
        match = _KEYSET.fullmatch(decoded)
        if match is None or int(match[1]) > MAX_ROW_NUMBER:
            raise self.make_error("invalid")
        return int(match[1])
