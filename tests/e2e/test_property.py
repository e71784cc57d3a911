"""Whatever arrives at ``POST /rpc``, the answer is well-formed JSON-RPC 2.0, and the
right one.

Three kinds of input are generated with Hypothesis: any JSON value, JSON-RPC-shaped
requests and batches (real method names and junk, any params and ids), and any bytes
(including deep nesting and long batches). For every input a small model of the
specification (plus this server's limits) predicts the answer: 204 with an empty body
when only notifications arrived, else one response object or a non-empty array of them,
answering exactly the ids of the valid non-notification requests (and one null id per
invalid item), never a 5xx, never an internal error.

The examples are derandomized (the same on every run) and no example database is kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from rpc_server.config import Settings
from rpc_server.methods import REGISTRY
from tests.conftest import World
from tests.e2e.conftest import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVICE_UNAVAILABLE,
    AppClientFactory,
)

JSON_CONTENT_TYPE = "application/json; charset=utf-8"

PROPERTY = hypothesis_settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the state a client holds never matters here
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_batch_length: int
    max_json_depth: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.max_body_bytes, settings.max_batch_length, settings.max_json_depth)


@dataclass(frozen=True)
class Expected:
    """What the server must answer.

    ``status`` 204 means no body. Otherwise either ``single`` (one response object: its
    error code, or None for "any result or error", and its id) or ``batch`` (an array
    answering exactly these ids, keyed by ``id_key``; ``invalid_items`` of the null ids
    are Invalid Request answers).
    """

    status: int
    single: tuple[int | None, Any] | None = None
    batch: Counter[str] | None = None
    invalid_items: int = 0


NOTHING = Expected(204)
PARSE = Expected(200, single=(PARSE_ERROR, None))
INVALID = Expected(200, single=(INVALID_REQUEST, None))
ALLOWED_MEMBERS = {"jsonrpc", "method", "params", "id"}


def id_key(value: Any) -> str:
    """Identity of an id, telling 1 from 1.0 from "1" (and big integers digit for digit)."""
    return json.dumps(value)


def depth(value: Any) -> int:
    """Nesting depth: a scalar is 0, [] and {} are 1, [[]] is 2 (without recursion)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        node, level = pending.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            children = node.values() if isinstance(node, dict) else node
            pending.extend((child, level + 1) for child in children)
    return deepest


def is_valid_request(item: Any) -> bool:
    """A JSON-RPC 2.0 request object as this server accepts it (no other members)."""
    if not isinstance(item, dict) or not set(item) <= ALLOWED_MEMBERS:
        return False
    if item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
        return False
    if "params" in item and not isinstance(item["params"], list | dict):
        return False
    id_ = item.get("id")
    return not isinstance(id_, bool) and isinstance(id_, str | int | float | type(None))


def expect(body: bytes, limits: Limits) -> Expected:
    """The model: what the server must answer to ``body``."""
    if len(body) > limits.max_body_bytes:
        return Expected(413, single=(INVALID_REQUEST, None))
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return PARSE
    if depth(parsed) > limits.max_json_depth:
        return PARSE
    payload = json.loads(body)  # the same value, with integers beyond 64 bits exact
    if not isinstance(payload, list):
        if not is_valid_request(payload):
            return INVALID
        if "id" not in payload:
            return NOTHING
        return Expected(200, single=(None, payload["id"]))
    if not payload or len(payload) > limits.max_batch_length:
        return INVALID
    ids = Counter(id_key(item["id"]) for item in payload if is_valid_request(item) and "id" in item)
    invalid = sum(not is_valid_request(item) for item in payload)
    if invalid:
        ids[id_key(None)] += invalid
    if not ids:
        return NOTHING
    return Expected(200, batch=ids, invalid_items=invalid)


def test_model_agrees_with_the_specification_examples() -> None:
    limits = Limits(1000, 3, 4)
    assert expect(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]', limits) == PARSE
    assert expect(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}', limits) == INVALID
    assert expect(b"[]", limits) == INVALID
    assert expect(b"[1,2,3,4]", limits) == INVALID  # longer than 3
    assert expect(b"[1,2,3]", limits) == Expected(200, batch=Counter({"null": 3}), invalid_items=3)
    assert expect(b'{"jsonrpc":"2.0","method":"x"}', limits) == NOTHING
    assert expect(b'[{"jsonrpc":"2.0","method":"x"}]', limits) == NOTHING
    assert expect(b'{"jsonrpc":"2.0","method":"x","id":1.0}', limits).single == (None, 1.0)
    assert expect(b"[[[[]]]]", limits) == Expected(200, batch=Counter({"null": 1}), invalid_items=1)
    assert expect(b"[[[[[]]]]]", limits) == PARSE
    assert expect(b" " * 1001, limits).status == 413
    assert id_key(2**70) == str(2**70)
    assert id_key(1.0) != id_key(1)


# --- checking an answer -----------------------------------------------------------------


def assert_response_object(answer: Any) -> None:
    assert isinstance(answer, dict), answer
    assert answer.get("jsonrpc") == "2.0", answer
    assert "id" in answer, answer
    assert ("result" in answer) != ("error" in answer), answer
    assert set(answer) <= {"jsonrpc", "id", "result", "error"}, answer
    if "error" in answer:
        error = answer["error"]
        assert isinstance(error, dict), answer
        assert type(error.get("code")) is int, answer
        assert isinstance(error.get("message"), str), answer
        assert set(error) <= {"code", "message", "data"}, answer
        # Client input never makes the server fail, and the database is there.
        assert error["code"] not in (INTERNAL_ERROR, SERVICE_UNAVAILABLE), answer


async def post_and_check(
    client: TestClient[Any, Any], body: bytes, limits: Limits, token: str | None = None
) -> None:
    expected = expect(body, limits)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await client.post("/rpc", data=body, headers=headers)
    text = await response.text()
    assert response.status < 500, text
    assert "Traceback" not in text
    assert response.status == expected.status, (body[:300], text[:300])
    if expected.status == 204:
        assert text == ""
        return
    assert response.headers["Content-Type"] == JSON_CONTENT_TYPE
    answer = json.loads(text)

    if expected.single is not None:
        assert_response_object(answer)
        code, id_ = expected.single
        assert id_key(answer["id"]) == id_key(id_), (body[:300], text[:300])
        if code is not None:
            assert answer["error"]["code"] == code, text[:300]
        return

    assert expected.batch is not None
    assert isinstance(answer, list), text[:300]
    assert answer
    for item in answer:
        assert_response_object(item)
    assert Counter(id_key(item["id"]) for item in answer) == expected.batch, (body, text)
    invalid_answers = [
        item
        for item in answer
        if item["id"] is None and item.get("error", {}).get("code") == INVALID_REQUEST
    ]
    assert len(invalid_answers) >= expected.invalid_items


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- strategies -------------------------------------------------------------------------

BIG_INTEGERS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1, -(2**64)])
# Beyond about 1e308 a JSON number parses as infinity, which is refused as a parse error.
INTEGERS = st.integers(min_value=-(2**1000), max_value=2**1000) | BIG_INTEGERS
SCALARS = (
    st.none()
    | st.booleans()
    | INTEGERS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

METHOD_NAMES = st.sampled_from([*REGISTRY.methods, "foobar", "rpc.discover", ""]) | st.text(
    max_size=20
)
PARAMS = st.lists(JSON_VALUES, max_size=4) | st.dictionaries(
    st.sampled_from(
        [
            "course",
            "purchase_id",
            "idempotency_key",
            "state",
            "limit",
            "cursor",
            "purchase_state",
            "error_msg",
            "payment_proof",
        ]
    )
    | st.text(max_size=10),
    JSON_VALUES,
    max_size=4,
)
IDS = st.none() | INTEGERS | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
WELL_FORMED_REQUESTS = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": METHOD_NAMES},
    optional={"params": PARAMS, "id": IDS},
)
JUNK_REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", "2", 2.0, None]) | JSON_VALUES,
        "method": METHOD_NAMES | JSON_VALUES,
        "params": PARAMS | JSON_VALUES,
        "id": IDS | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)
# Twice as many well-formed requests as junk ones.
REQUESTS = st.one_of(WELL_FORMED_REQUESTS, WELL_FORMED_REQUESTS, JUNK_REQUESTS)
REQUEST_BODIES = (
    REQUESTS
    | st.lists(REQUESTS | JSON_VALUES, min_size=1, max_size=12)
    | st.lists(WELL_FORMED_REQUESTS, min_size=1, max_size=8)
)
TOKENS = st.sampled_from(["none", "alice", "bob", "staff", "payments", "junk"])


def token_of(world: World, who: str) -> str | None:
    if who == "junk":
        return "rpcs_not-a-real-token"
    return None if who == "none" else getattr(world, who).token


def deep_bodies() -> st.SearchStrategy[bytes]:
    levels = st.integers(min_value=1, max_value=3000)
    call = b'{"jsonrpc":"2.0","method":"course.list","id":1,"params":'
    return st.one_of(
        levels.map(lambda n: b"[" * n),
        levels.map(lambda n: b"[" * n + b"]" * n),
        levels.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        levels.map(lambda n: call + b"[" * n + b"]" * n + b"}"),
        levels.map(lambda n: b"[" + call + b'{"x":' * n + b"0" + b"}" * n + b"}]"),
    )


def long_batches() -> st.SearchStrategy[bytes]:
    def batch(items: list[bytes]) -> bytes:
        return b"[" + b",".join(items) + b"]"

    call = st.integers(min_value=-5, max_value=10**20).map(
        lambda i: b'{"jsonrpc":"2.0","method":"foobar","id":%d}' % i
    )
    notification = st.just(b'{"jsonrpc":"2.0","method":"foobar"}')
    junk = st.sampled_from([b"1", b"null", b"[]", b"{}", b'"x"', b'{"jsonrpc":"2.0"}'])
    items = st.lists(call | notification | junk, min_size=0, max_size=260)
    same = st.tuples(call | notification | junk, st.integers(min_value=90, max_value=400))
    return items.map(batch) | same.map(lambda pair: batch([pair[0]] * pair[1]))


def mangled_requests() -> st.SearchStrategy[bytes]:
    """A well-formed request or batch with a slice cut out or replaced by other bytes."""

    def mangle(args: tuple[bytes, int, int, bytes]) -> bytes:
        body, start, length, replacement = args
        start = start % (len(body) + 1)
        return body[:start] + replacement + body[start + length :]

    return st.tuples(
        REQUEST_BODIES.map(encode),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=0, max_value=8),
        st.binary(max_size=4) | st.sampled_from([b"\\ud800", b"\xff", b"NaN", b"1e999", b"\\"]),
    ).map(mangle)


BYTES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    deep_bodies(),
    long_batches(),
    mangled_requests(),
)


# --- properties -------------------------------------------------------------------------


@pytest.fixture
def limits(settings: Settings) -> Limits:
    return Limits.of(settings)


@PROPERTY
@given(value=JSON_VALUES)
async def test_any_json_value_gets_a_well_formed_answer(
    client: TestClient[Any, Any], world: World, limits: Limits, value: Any
) -> None:
    await post_and_check(client, encode(value), limits)


@PROPERTY
@given(body=REQUEST_BODIES, who=TOKENS)
async def test_any_request_or_batch_is_answered_for_exactly_its_ids(
    client: TestClient[Any, Any], world: World, limits: Limits, body: Any, who: str
) -> None:
    await post_and_check(client, encode(body), limits, token_of(world, who))


SMALL_BODY_SETTINGS = {"max_body_bytes": 16 * 1024}


@pytest.fixture
async def small_body_client(
    app_client: AppClientFactory, settings: Settings
) -> TestClient[Any, Any]:
    return await app_client(settings=dataclasses.replace(settings, **SMALL_BODY_SETTINGS))


CALL = b'{"jsonrpc":"2.0","method":"foobar","id":1}'


@PROPERTY
@given(body=BYTES)
# The edges, always tried first: depth, batch length and body size at and past the limit.
@example(body=b"[" * 64 + b"]" * 64)
@example(body=b"[" * 65 + b"]" * 65)
@example(body=b"[" + b",".join([CALL] * 100) + b"]")
@example(body=b"[" + b",".join([CALL] * 101) + b"]")
@example(body=CALL + b" " * (SMALL_BODY_SETTINGS["max_body_bytes"] - len(CALL)))
@example(body=CALL + b" " * (SMALL_BODY_SETTINGS["max_body_bytes"] - len(CALL) + 1))
async def test_any_bytes_get_a_well_formed_answer(
    small_body_client: TestClient[Any, Any], settings: Settings, world: World, body: bytes
) -> None:
    limits = Limits.of(dataclasses.replace(settings, **SMALL_BODY_SETTINGS))
    await post_and_check(small_body_client, body, limits)
