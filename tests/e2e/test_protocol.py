"""JSON-RPC 2.0 over HTTP, to the letter: calls, notifications, batches, ids, errors, limits.

Bodies are sent byte for byte (``post``), so what is checked is what goes over the wire.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rpc_server.config import Settings
from tests.conftest import RpcCall, World
from tests.e2e.conftest import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    AppClientFactory,
    Counts,
    PostRaw,
    assert_error,
    notification_object,
    request_object,
    send,
)

# --- single calls and notifications ---------------------------------------------------


async def test_single_call_answers_result_and_id(post: PostRaw, world: World) -> None:
    reply = await post(request_object("course.list", id=7))
    assert reply.status == 200
    assert reply.content_type == "application/json"
    body = reply.json
    assert set(body) == {"jsonrpc", "result", "id"}
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == 7
    assert [course["slug"] for course in body["result"]] == ["python-basics", "sql-fundamentals"]


async def test_call_without_params_member_and_with_empty_params(
    post: PostRaw, world: World
) -> None:
    for params in (None, [], {}):
        body = (await post(request_object("course.list", params))).json
        assert len(body["result"]) == 2, params


async def test_notification_gets_204_with_empty_body_and_is_executed(
    post: PostRaw, rpc: RpcCall, world: World
) -> None:
    token = world.alice.token
    params = {"course": "python-basics", "idempotency_key": "notified-1"}
    reply = await post(notification_object("purchase.create", params), token=token)
    assert reply.status == 204
    assert reply.text == ""

    listed = (await rpc("purchase.list", token=token))["result"]["items"]
    assert [p["course"] for p in listed] == ["python-basics"]
    # The notification stored its idempotency key: the same call now replays its purchase.
    replayed = (await rpc("purchase.create", params, token=token))["result"]
    assert replayed["purchase_id"] == listed[0]["purchase_id"]


async def test_failing_notification_is_not_answered(
    post: PostRaw, world: World, row_counts: Counts
) -> None:
    before = await row_counts()
    for notification in (
        notification_object("no.such.method"),
        notification_object("purchase.create", {"course": "no-such-course"}),
        notification_object("purchase.create", {"course": 5}),
        notification_object("purchase.list"),  # no token: 401, unanswered
    ):
        reply = await post(notification, token=None)
        assert (reply.status, reply.text) == (204, ""), notification
    assert await row_counts() == before


async def test_batch_of_only_notifications_gets_204_and_all_run(
    post: PostRaw, rpc: RpcCall, world: World
) -> None:
    token = world.alice.token
    batch = [
        notification_object("purchase.create", {"course": "python-basics"}),
        notification_object("purchase.create", {"course": "sql-fundamentals"}),
        notification_object("course.list"),
    ]
    reply = await post(batch, token=token)
    assert (reply.status, reply.text) == (204, "")
    listed = (await rpc("purchase.list", token=token))["result"]["items"]
    assert sorted(p["course"] for p in listed) == ["python-basics", "sql-fundamentals"]


# --- batches ----------------------------------------------------------------------------


async def test_mixed_batch_answers_each_valid_call_and_each_invalid_item(
    post: PostRaw, world: World
) -> None:
    batch = [
        request_object("course.list", id="first"),
        1,
        "x",
        {"jsonrpc": "1.0", "method": "course.list", "id": 9},
        notification_object("course.list"),
        request_object("no.such.method", id=2),
        request_object("purchase.list", id=3),  # no token in this request: 401
        None,
        [],
    ]
    reply = await post(batch)
    assert reply.status == 200
    answers = reply.json
    assert isinstance(answers, list)
    assert len(answers) == 3 + 5  # three calls, five invalid items, no notification

    by_id = {a["id"]: a for a in answers if a["id"] is not None}
    assert set(by_id) == {"first", 2, 3}
    assert len(by_id["first"]["result"]) == 2
    assert_error(by_id[2], METHOD_NOT_FOUND, 2)
    assert_error(by_id[3], 401, 3)

    invalid = [a for a in answers if a["id"] is None]
    assert len(invalid) == 5
    for answer in invalid:
        assert_error(answer, INVALID_REQUEST, None)


async def test_batch_of_numbers_answers_three_invalid_requests(post: PostRaw) -> None:
    answers = (await post("[1,2,3]")).json
    assert isinstance(answers, list)
    assert len(answers) == 3
    for answer in answers:
        assert_error(answer, INVALID_REQUEST, None)


async def test_empty_batch_answers_one_invalid_request_object(post: PostRaw) -> None:
    reply = await post("[]")
    assert reply.status == 200
    assert_error(reply.json, INVALID_REQUEST, None)  # an object, not an array


async def test_batch_answers_come_as_an_array_even_for_one_call(post: PostRaw) -> None:
    answers = (await post([request_object("course.list", id=1)])).json
    assert isinstance(answers, list)
    assert [a["id"] for a in answers] == [1]


async def test_batch_longer_than_max_batch_length_is_one_invalid_request(
    app_client: AppClientFactory, settings: Settings, world: World, row_counts: Counts
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_batch_length=3))
    create = {"course": "python-basics"}
    before = await row_counts()

    too_long = [request_object("purchase.create", create, id=i) for i in range(4)]
    reply = await send(client, too_long, token=world.alice.token)
    assert reply.status == 200
    error = assert_error(reply.json, INVALID_REQUEST, None)  # one object, not an array
    assert "3" in error["data"]
    assert await row_counts() == before  # nothing in the rejected batch ran

    at_limit = [request_object("purchase.create", create, id=i) for i in range(3)]
    answers = (await send(client, at_limit, token=world.alice.token)).json
    assert sorted(a["id"] for a in answers) == [0, 1, 2]
    assert all("result" in a for a in answers)


# --- parse errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"jsonrpc": "2.0", "method": "course.list"', id="truncated"),
        pytest.param('{"jsonrpc": "2.0", "method": "course.list", "id": 1,}', id="trailing-comma"),
        pytest.param("", id="empty-body"),
        pytest.param("NaN", id="nan"),
        pytest.param('{"jsonrpc": "2.0", "method": "course.list", "id": NaN}', id="nan-id"),
        pytest.param("[Infinity]", id="infinity"),
        pytest.param('{"jsonrpc":"2.0","method":"course.list","id":-Infinity}', id="minus-inf"),
        pytest.param('{"jsonrpc":"2.0","method":"course.list","id":1e400}', id="overflow"),
        pytest.param("[" * 100_000, id="deep-array"),
        pytest.param('{"a":' * 100_000, id="deep-object"),
        pytest.param(b'{"jsonrpc":"2.0","method":"course.list\xff","id":1}', id="not-utf8"),
        pytest.param(b"\xc3\x28", id="bad-utf8-sequence"),
        pytest.param("'single quotes'", id="single-quotes"),
    ],
)
async def test_unparseable_body_is_parse_error_with_null_id(
    post: PostRaw, body: str | bytes
) -> None:
    reply = await post(body)
    assert reply.status == 200
    assert_error(reply.json, PARSE_ERROR, None)


async def test_nesting_beyond_the_depth_limit_is_a_parse_error(post: PostRaw) -> None:
    """500 levels is valid JSON, but deeper than RPC_SERVER_MAX_JSON_DEPTH (64)."""
    reply = await post("[" * 500 + "]" * 500)
    assert reply.status == 200
    assert_error(reply.json, PARSE_ERROR, None)
    assert "64" in reply.json["error"]["data"]


async def test_nesting_within_the_depth_limit_is_judged_item_by_item(post: PostRaw) -> None:
    reply = await post("[" * 30 + "]" * 30)
    assert reply.status == 200
    [answer] = reply.json
    assert_error(answer, INVALID_REQUEST, None)


# --- ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_id",
    ['"abc"', "0", "-7", '""', "null", "1.5", str(2**70), str(-(2**70)), '"\\u00e9\\u4e2d"'],
)
async def test_id_is_echoed_exactly(post: PostRaw, raw_id: str) -> None:
    reply = await post('{"jsonrpc": "2.0", "method": "course.list", "id": ' + raw_id + "}")
    body = reply.json  # json.loads keeps big integers exact
    sent = json.loads(raw_id)
    assert body["id"] == sent
    assert type(body["id"]) is type(sent)
    assert "result" in body


async def test_big_integer_id_is_echoed_digit_for_digit(post: PostRaw) -> None:
    reply = await post(f'{{"jsonrpc":"2.0","method":"course.list","id":{2**70}}}')
    assert f'"id":{2**70}' in reply.text.replace(" ", "")


# Number ids whose value alone would not give their text back (a float parse loses the
# digits, -0 is 0 to an integer, 1e2 is 100.0): the answer carries the text as sent.
NUMBER_ID_TEXTS = [
    "1.0000000000000000001",
    "-0",
    "-0.0",
    "1e2",
    "1E+2",
    "2.50",
    "1e-7",
    "-1.5e+10",
    str(2**70),
    "9" * 1000,
]


def id_text_of(reply_text: str) -> str:
    """The id member of one answer, exactly as written on the wire."""
    assert reply_text.endswith("}"), reply_text
    _, marker, id_text = reply_text.rpartition(',"id":')
    assert marker, reply_text
    return id_text[:-1]


@pytest.mark.parametrize("raw_id", NUMBER_ID_TEXTS, ids=lambda text: text[:24])
async def test_number_id_comes_back_as_written(post: PostRaw, world: World, raw_id: str) -> None:
    for method, token in (
        ("course.list", None),  # a result
        ("no.such.method", None),  # an error from the dispatcher
        ("purchase.list", None),  # 401
        ("purchase.get", world.alice.token),  # invalid params
    ):
        reply = await post(f'{{"jsonrpc":"2.0","method":"{method}","id":{raw_id}}}', token=token)
        assert reply.status == 200
        assert id_text_of(reply.text) == raw_id, (method, reply.text[:200])


async def test_number_ids_of_a_batch_come_back_as_written(post: PostRaw, world: World) -> None:
    raw_ids = [*NUMBER_ID_TEXTS[:-1], "7", '"seven"']
    body = "[" + ",".join(f'{{"jsonrpc":"2.0","method":"course.list","id":{i}}}' for i in raw_ids)
    reply = await post(body + ',{"jsonrpc":"2.0","method":"course.list"}]')  # + a notification
    assert reply.status == 200
    answers = json.loads(reply.text, parse_int=str, parse_float=str)  # numbers as their text
    assert sorted(answer["id"] for answer in answers) == sorted([*raw_ids[:-1], "seven"])
    for raw_id in raw_ids:
        assert f',"id":{raw_id}}}' in reply.text


@pytest.mark.parametrize("digits", [1001, 5000, 100_000])
async def test_an_over_long_number_is_a_parse_error_of_our_own(
    post: PostRaw, world: World, digits: int
) -> None:
    for body in (
        f'{{"jsonrpc":"2.0","method":"course.list","id":{"1" * digits}}}',
        f'{{"jsonrpc":"2.0","method":"course.list","id":0.{"1" * digits}}}',
        f'{{"jsonrpc":"2.0","method":"course.list","params":[{"1" * digits}],"id":1}}',
    ):
        reply = await post(body)
        assert reply.status == 200
        error = assert_error(reply.json, PARSE_ERROR, None)
        assert error["data"] == "a number is longer than 1000 characters"
        assert "sys." not in reply.text and "digits" not in reply.text


async def test_id_of_error_answers_is_echoed(post: PostRaw, world: World) -> None:
    body = (await post(request_object("no.such.method", id="req-42"))).json
    assert_error(body, METHOD_NOT_FOUND, "req-42")
    body = (await post(request_object("purchase.get", {"purchase_id": "x"}, id=-1))).json
    assert_error(body, 401, -1)


# --- invalid requests -------------------------------------------------------------------


async def test_method_not_found(post: PostRaw) -> None:
    for method in ("no.such.method", "", "COURSE.LIST", "rpc.discover_typo"):
        assert_error((await post(request_object(method, id=1))).json, METHOD_NOT_FOUND, 1)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "params": 3, "id": 1}, id="int"),
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "params": "x", "id": 1}, id="str"),
        pytest.param(
            {"jsonrpc": "2.0", "method": "course.list", "params": True, "id": 1}, id="bool"
        ),
        pytest.param(
            {"jsonrpc": "2.0", "method": "course.list", "params": None, "id": 1}, id="null"
        ),
    ],
)
async def test_scalar_params_is_invalid_request(post: PostRaw, request_: Any) -> None:
    assert_error((await post(request_)).json, INVALID_REQUEST, None)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "id": 1, "x": 1}, id="unknown"),
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "id": True}, id="id-true"),
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "id": False}, id="id-false"),
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "id": [1]}, id="id-array"),
        pytest.param({"jsonrpc": "2.0", "method": "course.list", "id": {}}, id="id-object"),
        pytest.param({"method": "course.list", "id": 1}, id="no-jsonrpc"),
        pytest.param({"jsonrpc": "1.0", "method": "course.list", "id": 1}, id="jsonrpc-1.0"),
        pytest.param({"jsonrpc": 2.0, "method": "course.list", "id": 1}, id="jsonrpc-number"),
        pytest.param({"jsonrpc": "2.0", "id": 1}, id="no-method"),
        pytest.param({"jsonrpc": "2.0", "method": 1, "id": 1}, id="method-number"),
        pytest.param({"jsonrpc": "2.0", "method": None, "id": 1}, id="method-null"),
        pytest.param(1, id="number"),
        pytest.param("course.list", id="string"),
        pytest.param(None, id="null"),
        pytest.param(True, id="true"),
    ],
)
async def test_malformed_request_object_is_invalid_request(post: PostRaw, request_: Any) -> None:
    reply = await post(json.dumps(request_))
    assert reply.status == 200
    assert_error(reply.json, INVALID_REQUEST, None)


async def test_invalid_request_is_not_executed(
    post: PostRaw, world: World, row_counts: Counts
) -> None:
    before = await row_counts()
    create = request_object("purchase.create", {"course": "python-basics"})
    for invalid in (
        {**create, "extra": 1},
        {**create, "id": True},
        {**create, "jsonrpc": "1.0"},
        [{**create, "extra": 1}, {**create, "id": False}],
    ):
        reply = await post(invalid, token=world.alice.token)
        assert reply.status == 200
        assert INVALID_REQUEST in [a["error"]["code"] for a in _as_list(reply.json)]
    assert await row_counts() == before


def _as_list(body: Any) -> list[Any]:
    return body if isinstance(body, list) else [body]


# --- echoed text is always valid JSON: a lone surrogate is not a 500 --------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"jsonrpc":"2.0","method":"\\ud800","id":1}', id="method"),
        pytest.param('{"jsonrpc":"2.0","method":"course.list","id":"\\udfff"}', id="id"),
        pytest.param('[{"jsonrpc":"2.0","method":"x\\ud83d","id":1}]', id="method-in-batch"),
    ],
)
async def test_lone_surrogate_in_echoed_text_is_answered_not_500(
    post: PostRaw, world: World, body: str
) -> None:
    # "\ud800" is valid JSON text; the server echoes it back (method name in the
    # -32601 data, the id) and must still answer well-formed UTF-8 JSON.
    reply = await post(body)
    assert reply.status == 200, reply.text
    for answer in _as_list(reply.json):
        assert answer["jsonrpc"] == "2.0"


async def test_lone_surrogate_in_unknown_param_name_is_invalid_params(
    post: PostRaw, world: World
) -> None:
    body = '{"jsonrpc":"2.0","method":"purchase.list","params":{"\\ud800":1},"id":1}'
    reply = await post(body, token=world.alice.token)
    assert reply.status == 200, reply.text
    assert reply.json["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS)


# --- limits -----------------------------------------------------------------------------


@pytest.fixture
async def small_body_client(
    app_client: AppClientFactory, settings: Settings
) -> TestClient[Any, Any]:
    return await app_client(settings=dataclasses.replace(settings, max_body_bytes=1024))


def padded_call(size: int) -> bytes:
    """A valid course.list call of exactly ``size`` bytes (padded with spaces)."""
    call = json.dumps(request_object("course.list", id=1)).encode()
    return call + b" " * (size - len(call))


async def test_body_over_max_body_bytes_is_413_with_invalid_request(
    small_body_client: TestClient[Any, Any],
) -> None:
    response = await small_body_client.post("/rpc", data=io.BytesIO(padded_call(1025)))
    assert response.status == 413
    assert_error(await response.json(), INVALID_REQUEST, None)


async def test_chunked_body_over_max_body_bytes_is_413(
    small_body_client: TestClient[Any, Any],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        body = padded_call(4000)
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = await small_body_client.post("/rpc", data=chunks())
    assert response.status == 413
    assert_error(await response.json(), INVALID_REQUEST, None)


async def test_body_of_exactly_max_body_bytes_is_accepted(
    small_body_client: TestClient[Any, Any], world: World
) -> None:
    response = await small_body_client.post("/rpc", data=padded_call(1024))
    assert response.status == 200
    assert len((await response.json())["result"]) == 2


async def test_huge_body_is_413_with_default_settings(client: TestClient[Any, Any]) -> None:
    response = await client.post("/rpc", data=io.BytesIO(padded_call(1024 * 1024 + 1)))
    assert response.status == 413
    assert_error(await response.json(), INVALID_REQUEST, None)


# --- HTTP -------------------------------------------------------------------------------


async def test_healthz(client: TestClient[Any, Any]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_verbs_on_rpc_are_405(client: TestClient[Any, Any], verb: str) -> None:
    response = await client.request(verb, "/rpc")
    assert response.status == 405


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json; charset=utf-8", "application/x-anything"]
)
async def test_any_content_type_is_accepted(post: PostRaw, world: World, content_type: str) -> None:
    reply = await post(
        json.dumps(request_object("course.list")), headers={"Content-Type": content_type}
    )
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert len(reply.json["result"]) == 2
