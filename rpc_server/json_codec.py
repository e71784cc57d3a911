"""JSON in and out: orjson on the hot path, the standard library where orjson falls short.

orjson parses an integer beyond 64 bits as a float, which would turn such a request id
into a different number in the answer. A float id is rare (the specification advises
against fractions), so when one appears the body is parsed again with the standard
library, which keeps integers exact. orjson also refuses to serialize such integers;
they are spliced into its output as digits. Nesting deeper than orjson's limit (1024) is a
parse error, never a RecursionError.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

import orjson


class ParseError(ValueError):
    """The body is not one JSON value we accept; the message is fit for the client."""


def _reject_constant(name: str) -> float:
    raise ParseError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"number {text} is out of range")
    return value


def _has_float_id(payload: Any) -> bool:
    items = payload if isinstance(payload, list) else [payload]
    return any(isinstance(item, dict) and isinstance(item.get("id"), float) for item in items)


def depth_exceeds(value: Any, limit: int) -> bool:
    """True if ``value`` nests arrays/objects more than ``limit`` levels deep.

    A scalar has depth 0, ``[]`` and ``{}`` depth 1, ``[[]]`` depth 2. Iterative, so
    it cannot itself run out of stack.
    """
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads(body: bytes, *, max_depth: int = 64) -> Any:
    """Parse a request body strictly: no NaN or Infinity, no overflowing numbers, no
    nesting deeper than ``max_depth``.

    Raises ParseError.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "number is infinity" not in str(exc):
            raise ParseError(f"Invalid JSON: {exc}") from None
        # An integer of hundreds of digits is valid JSON that orjson cannot hold;
        # the standard library keeps it exact (and still refuses infinite floats).
        payload = _strict_stdlib_loads(body)
    # Each level of nesting takes an opening and a closing bracket: a body shorter than
    # twice the limit cannot nest deeper than it, and needs no walk.
    if len(body) > 2 * max_depth and depth_exceeds(payload, max_depth):
        raise ParseError(f"JSON nested deeper than {max_depth} levels")
    if _has_float_id(payload):
        # Keep a big integer id exact (orjson has already checked the syntax and depth).
        payload = _strict_stdlib_loads(body)
    return payload


def _strict_stdlib_loads(body: bytes) -> Any:
    """The standard library's parse, held to orjson's rules (the rare, slow path)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ParseError("JSON nested too deeply") from None
    except ParseError:
        raise
    except ValueError as exc:
        raise ParseError(f"Invalid JSON: {exc}") from None
    if _has_lone_surrogate(payload):
        raise ParseError("Invalid JSON: a string holds a lone surrogate (not Unicode text)")
    return payload


def _has_lone_surrogate(value: Any) -> bool:
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


# JSON serialized once and spliced into answers as it is (the OpenRPC document).
Fragment = orjson.Fragment

_ORJSON_INTEGERS = range(-(2**63), 2**64)


def dumps(payload: Any) -> bytes:
    """Serialize an answer. Everything in it is already JSON-native (the schemas turn
    decimals and datetimes into strings deliberately), or a ``Fragment``."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return _dumps_with_big_ids(payload)


def _dumps_with_big_ids(payload: Any) -> bytes:
    """orjson refuses integers beyond 64 bits; the only ones an answer can hold are
    request ids echoed back. Each goes in as a unique marker string, and its exact
    digits replace the marker in the bytes."""
    answers = payload if isinstance(payload, list) else [payload]
    digits: dict[bytes, bytes] = {}
    patched = []
    for answer in answers:
        id_ = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(id_, int) and not isinstance(id_, bool) and id_ not in _ORJSON_INTEGERS:
            marker = f"big-id-{len(digits)}-{secrets.token_hex(8)}"
            digits[b'"' + marker.encode() + b'"'] = str(id_).encode()
            answer = {**answer, "id": marker}
        patched.append(answer)
    body = orjson.dumps(patched if isinstance(payload, list) else patched[0])
    for quoted, exact in digits.items():
        body = body.replace(quoted, exact, 1)
    return body
