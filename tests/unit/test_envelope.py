"""The JSON-RPC envelope: strict parsing, per-item checks, batches."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest

from rpc_server.domain.links import FrontendLinks
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.envelope import (
    ParseError,
    answer,
    error_object,
    invalid_request,
    parse,
    parse_error,
    problem_with,
)
from rpc_server.jsonrpc.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from rpc_server.jsonrpc.json_codec import ExactNumber
from rpc_server.jsonrpc.registry import MethodRegistry
from rpc_server.methods import REGISTRY
from rpc_server.payment_signatures import PaymentSignatures
from tests.unit.conftest import FRONTEND_URL, FakeWorld

VALID: dict[str, Any] = {"jsonrpc": "2.0", "method": "course.list", "id": 1}


# problem_with


@pytest.mark.parametrize("item", [[], "x", 1, None, True, [VALID]])
def test_a_request_must_be_an_object(item: Any) -> None:
    assert problem_with(item) == "A request must be a JSON object."


@pytest.mark.parametrize(
    "request_object",
    [
        {"method": "course.list", "id": 1},
        {**VALID, "jsonrpc": "1.0"},
        {**VALID, "jsonrpc": 2.0},
        {**VALID, "jsonrpc": 2},
        {**VALID, "jsonrpc": None},
        {**VALID, "jsonrpc": "2.0 "},
    ],
    ids=["missing", "1.0", "number-2.0", "number-2", "null", "padded"],
)
def test_jsonrpc_must_be_exactly_2_0(request_object: dict[str, Any]) -> None:
    assert problem_with(request_object) == 'The "jsonrpc" member must be exactly "2.0".'


@pytest.mark.parametrize("method", [None, 1, ["course.list"], {"name": "x"}, True])
def test_method_must_be_a_string(method: Any) -> None:
    assert problem_with({**VALID, "method": method}) == 'The "method" member must be a string.'


def test_method_is_required() -> None:
    assert problem_with({"jsonrpc": "2.0", "id": 1}) == 'The "method" member must be a string.'


@pytest.mark.parametrize("params", ["abc", 1, 1.5, True, None])
def test_params_must_be_structured(params: Any) -> None:
    assert (
        problem_with({**VALID, "params": params})
        == 'The "params" member must be an array or an object.'
    )


@pytest.mark.parametrize("params", [[], {}, [1, "a"], {"a": 1}])
def test_params_array_or_object_is_valid(params: Any) -> None:
    assert problem_with({**VALID, "params": params}) is None


@pytest.mark.parametrize("id_", [True, False, {}, {"a": 1}, [], [1]])
def test_invalid_ids(id_: Any) -> None:
    assert (
        problem_with({**VALID, "id": id_}) == 'The "id" member must be a string, a number or null.'
    )


@pytest.mark.parametrize("id_", ["abc", "", 1, 0, -7, 2**70, 1.5, ExactNumber("1e2"), None])
def test_valid_ids(id_: Any) -> None:
    assert problem_with({**VALID, "id": id_}) is None


def test_a_notification_has_no_id() -> None:
    notification = {"jsonrpc": "2.0", "method": "course.list"}
    assert problem_with(notification) is None


def test_unknown_members_are_named() -> None:
    problem = problem_with({**VALID, "zeta": 1, "alpha": 2})
    assert problem == "Unknown members: alpha, zeta."


def test_checks_are_in_order_jsonrpc_first() -> None:
    assert problem_with({"jsonrpc": "1.0", "method": 1, "extra": 1}) == (
        'The "jsonrpc" member must be exactly "2.0".'
    )


# parse


def test_parse_valid_json() -> None:
    assert parse(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


@pytest.mark.parametrize("body", [b"", b"{", b"{'a': 1}", b"[1,]", b"nul", b'{"a" 1}'])
def test_invalid_json_is_a_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError, match="Invalid JSON"):
        parse(body)


def test_undecodable_bytes_are_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse(b'{"a": "\xff\xfe\xfa"}')


@pytest.mark.parametrize(
    "body", [b"NaN", b"Infinity", b"-Infinity", b'{"id": NaN}', b"[1, Infinity]"]
)
def test_nan_and_infinity_are_rejected(body: bytes) -> None:
    with pytest.raises(ParseError, match="Invalid JSON"):
        parse(body)


@pytest.mark.parametrize("body", [b"1e400", b"-1e400", b'{"id": 1.5e999}'])
def test_overflowing_numbers_are_rejected(body: bytes) -> None:
    with pytest.raises(ParseError, match="out of range"):
        parse(body)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000])
def test_deep_nesting_is_a_parse_error_not_a_recursion_error(body: bytes) -> None:
    with pytest.raises(ParseError, match="depth limit exceeded"):
        parse(body)


def test_big_integers_are_exact() -> None:
    assert parse(str(2**70).encode()) == 2**70
    assert parse(b'{"params": [1180591620717411303424]}')["params"] == [2**70]
    # An id keeps its text, digit for digit (rpc_server.jsonrpc.json_codec.ExactNumber).
    assert parse(b'{"id": 1180591620717411303424}')["id"] == ExactNumber(str(2**70))


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(ParseError, ValueError)


# Error objects


def test_error_objects() -> None:
    assert error_object(1, "m") == {
        "jsonrpc": "2.0",
        "error": {"code": 1, "message": "m"},
        "id": None,
    }
    assert error_object(1, "m", {"d": 1}, id=5)["error"]["data"] == {"d": 1}
    assert parse_error("why")["error"] == {
        "code": PARSE_ERROR,
        "message": "Parse error",
        "data": "why",
    }
    assert invalid_request("why")["error"]["code"] == INVALID_REQUEST


# answer: item by item


def ctx(fake: FakeWorld) -> RpcContext:
    return RpcContext(
        uow=fake.uow, links=FrontendLinks(FRONTEND_URL), payments=PaymentSignatures(())
    )


async def test_answer_one_request(fake: FakeWorld) -> None:
    response = await answer(VALID, REGISTRY, ctx(fake), max_batch_length=10)
    assert isinstance(response, dict)
    assert response["id"] == 1
    assert [c["slug"] for c in response["result"]] == ["python-basics", "sql-fundamentals"]


async def test_a_notification_is_not_answered(fake: FakeWorld) -> None:
    notification = {"jsonrpc": "2.0", "method": "course.list"}
    assert await answer(notification, REGISTRY, ctx(fake), max_batch_length=10) is None
    assert await answer([notification] * 2, REGISTRY, ctx(fake), max_batch_length=10) is None


async def test_a_number_id_kept_as_text_is_answered_with_that_text(fake: FakeWorld) -> None:
    payload = parse(b'[{"jsonrpc": "2.0", "method": "nope", "id": 1e2}, {"jsonrpc": "2.0"}]')
    answers = await answer(payload, REGISTRY, ctx(fake), max_batch_length=10)
    assert isinstance(answers, list)
    assert [a["id"] for a in answers] == [ExactNumber("1e2"), None]
    assert answers[0]["error"]["code"] == METHOD_NOT_FOUND


async def test_a_batch_is_answered_item_by_item(fake: FakeWorld) -> None:
    batch = [
        {**VALID, "id": "a"},
        {"jsonrpc": "1.0", "method": "course.list", "id": "b"},
        {"jsonrpc": "2.0", "method": "course.list"},
        {"jsonrpc": "2.0", "method": "no.such.method", "id": "c"},
        7,
    ]
    responses = await answer(batch, REGISTRY, ctx(fake), max_batch_length=10)
    assert isinstance(responses, list)
    assert len(responses) == 4
    by_code = [r.get("error", {}).get("code") for r in responses]
    assert by_code == [None, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_REQUEST]
    assert responses[0]["id"] == "a"
    assert responses[2]["id"] == "c"
    assert json.dumps(responses)  # serializable as is


async def test_empty_batch_is_an_invalid_request(fake: FakeWorld) -> None:
    response = await answer([], REGISTRY, ctx(fake), max_batch_length=10)
    assert isinstance(response, dict)
    assert response["error"]["code"] == INVALID_REQUEST


async def test_batch_length_is_limited(fake: FakeWorld) -> None:
    at_limit = await answer([VALID] * 3, REGISTRY, ctx(fake), max_batch_length=3)
    assert isinstance(at_limit, list)
    assert len(at_limit) == 3
    over = await answer([VALID] * 4, REGISTRY, ctx(fake), max_batch_length=3)
    assert isinstance(over, dict)
    assert over["error"]["code"] == INVALID_REQUEST
    assert "at most 3" in over["error"]["data"]


async def test_a_read_ahead_hook_that_fails_leaves_the_batch_answered(fake: FakeWorld) -> None:
    """A method's ``read_ahead`` is a hint: whatever it raises, every call still runs
    and answers as it would without it; calls with invalid params never reach it."""
    told: list[Mapping[str, Any]] = []

    def failing(ctx: RpcContext, params: Mapping[str, Any]) -> None:
        told.append(params)
        raise RuntimeError("the hint broke")

    listed = dataclasses.replace(REGISTRY.methods["course.list"], read_ahead=failing)
    registry = MethodRegistry([listed])
    batch = [{**VALID, "id": 1}, {**VALID, "params": {"nope": 1}, "id": 2}, {**VALID, "id": 3}]
    responses = await answer(batch, registry, ctx(fake), max_batch_length=10)
    assert isinstance(responses, list)
    assert [("result" in r, r.get("error", {}).get("code")) for r in responses] == [
        (True, None),
        (False, INVALID_PARAMS),
        (True, None),
    ]
    assert told == [{}, {}]  # the two valid calls' loaded params, before they ran
