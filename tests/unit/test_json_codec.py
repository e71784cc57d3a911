"""The JSON codec: ids come back as written, over-long numbers are our own parse error,
ordinary bodies never leave orjson's fast path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpc_server.jsonrpc.json_codec import (
    MAX_NUMBER_LENGTH,
    ExactNumber,
    ParseError,
    depth_exceeds,
    dumps,
    loads,
)


def echo_id(raw_id: str) -> bytes:
    """Parse a request with this id text, then serialize an answer carrying its id."""
    request = loads(f'{{"jsonrpc":"2.0","method":"m","id":{raw_id}}}'.encode())
    return dumps({"jsonrpc": "2.0", "result": None, "id": request["id"]})


@pytest.mark.parametrize(
    "raw_id",
    [
        "1.0000000000000000001",
        "-0",
        "-0.0",
        "1e2",
        "1E2",
        "1e+2",
        "1.50",
        "0.1",
        "1e-7",
        "-1.5e+10",
        "100000000000000000000000000000.0",
        str(2**70),
        str(-(2**70)),
        str(-(2**64)),
        "123456789012345678901234567890",
        "9" * MAX_NUMBER_LENGTH,
    ],
)
def test_number_ids_come_back_as_written(raw_id: str) -> None:
    assert echo_id(raw_id) == f'{{"jsonrpc":"2.0","result":null,"id":{raw_id}}}'.encode()


@pytest.mark.parametrize("raw_id", ["0", "7", "-7", str(2**63 - 1), '"abc"', "null"])
def test_ordinary_ids_come_back_as_written(raw_id: str) -> None:
    assert echo_id(raw_id) == f'{{"jsonrpc":"2.0","result":null,"id":{raw_id}}}'.encode()


def test_each_id_of_a_batch_comes_back_as_written() -> None:
    raw_ids = ["1e2", "7", '"x"', "-0", str(2**70), "2.50"]
    body = "[" + ",".join(f'{{"jsonrpc":"2.0","method":"m","id":{i}}}' for i in raw_ids) + "]"
    answers = [{"result": 1, "id": item["id"]} for item in loads(body.encode())]
    assert (
        dumps(answers)
        == ("[" + ",".join(f'{{"result":1,"id":{i}}}' for i in raw_ids) + "]").encode()
    )


def test_only_ids_keep_their_text_other_numbers_are_numbers() -> None:
    payload = loads(b'{"id": 1e2, "params": [1, 2.5, -0, 1e2, 1180591620717411303424]}')
    assert payload["id"] == ExactNumber("1e2")
    params = payload["params"]
    assert params == [1, 2.5, 0, 100.0, 2**70]
    assert [type(number) for number in params] == [int, float, int, float, int]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"jsonrpc":"2.0","method":"m","id":' + b"1" * 5000 + b"}", id="id-5000"),
        pytest.param(
            b'{"jsonrpc":"2.0","method":"m","id":' + b"1" * (MAX_NUMBER_LENGTH + 1) + b"}",
            id="id-one-too-long",
        ),
        pytest.param(b'{"jsonrpc":"2.0","method":"m","id":0.' + b"1" * 5000 + b"}", id="float-id"),
        pytest.param(b'{"params":[' + b"1" * 5000 + b'],"id":"a"}', id="param-5000"),
        pytest.param(b"1" * 100_000, id="bare-100000"),
    ],
)
def test_an_over_long_number_is_our_own_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError) as refused:
        loads(body)
    message = str(refused.value)
    assert message == f"a number is longer than {MAX_NUMBER_LENGTH} characters"
    assert "set_int_max_str_digits" not in message


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"m","id":7,"params":[1.5, "2024-01-01"]}',
        b'[{"jsonrpc":"2.0","method":"m","id":"a"},{"jsonrpc":"2.0","method":"m","id":3}]',
        b'{"jsonrpc":"2.0","method":"m","id":null}',
        b'{"jsonrpc":"2.0","method":"m"}',
    ],
)
def test_ordinary_bodies_stay_on_the_fast_path(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the standard library's parser ran")

    expected = json.loads(body)
    # json_codec's slow path is the standard library's json.loads
    monkeypatch.setattr(json, "loads", slow_path)
    assert loads(body) == expected


def test_a_zero_id_in_a_body_without_minus_zero_stays_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(json, "loads", None)  # would fail if called
    assert loads(b'{"jsonrpc":"2.0","method":"m","id":0}')["id"] == 0


BIG = str(2**1100).encode()  # too big for orjson: the standard library reads the body


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": ' + BIG + b', "params": ["\\ud800"]}',
        b'{"id": ' + BIG + b', "\\udc00": 1}',
        b"[" + BIG + b', "\\ud800"]',
    ],
)
def test_the_slow_path_refuses_lone_surrogates_as_orjson_does(body: bytes) -> None:
    with pytest.raises(ParseError, match="surrogate"):
        loads(body)


@pytest.mark.parametrize("body", [b'{"id": 1e400}', b'{"id": -1e400}', b'{"id": 1, "x": 1e999}'])
def test_infinite_numbers_are_refused_on_either_path(body: bytes) -> None:
    with pytest.raises(ParseError, match="out of range"):
        loads(body)


def test_exact_numbers_show_their_text_in_logs() -> None:
    assert repr(ExactNumber("1e2")) == "1e2"
    assert f"{ExactNumber('-0')!r}" == "-0"


def test_other_objects_are_still_not_json() -> None:
    with pytest.raises(TypeError):
        dumps({"id": object()})


def _depth_by_recursion(value: Any) -> int:
    """The definition: a scalar 0, an empty array or object 1, else 1 + its deepest child."""
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return 0
    return 1 + max(map(_depth_by_recursion, value), default=0)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=40,
)


@given(_JSON, st.integers(min_value=0, max_value=8))
def test_depth_exceeds_agrees_with_the_definition(value: Any, limit: int) -> None:
    assert depth_exceeds(value, limit) is (_depth_by_recursion(value) > limit)


def test_depth_exceeds_walks_deep_nesting_without_recursion() -> None:
    deep: list[Any] = []
    for _ in range(4999):
        deep = [deep]
    assert depth_exceeds(deep, 4999) and not depth_exceeds(deep, 5000)
