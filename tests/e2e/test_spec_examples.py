"""Section 7 of the JSON-RPC 2.0 specification, example by example, over HTTP.

The specification's methods (subtract, sum, update, notify_hello, get_data) are replaced
by this server's: ``purchase.get`` and ``purchase.create`` take params by position or by
name, ``course.list`` answers without any; ``foobar`` stays the method that does not
exist. Bodies are sent byte for byte, and batch answers are matched by id, never by
position, since the specification leaves their order open.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.conftest import RpcCall, World
from tests.e2e.conftest import (
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Counts,
    CreatePurchase,
    PostRaw,
)


def assert_response_shape(answer: Any) -> None:
    """A response object: jsonrpc 2.0, an id, and exactly one of result and error."""
    assert isinstance(answer, dict), answer
    assert answer["jsonrpc"] == "2.0", answer
    assert "id" in answer, answer
    assert ("result" in answer) != ("error" in answer), answer
    assert set(answer) <= {"jsonrpc", "id", "result", "error"}, answer
    if "error" in answer:
        error = answer["error"]
        assert isinstance(error["code"], int), answer
        assert not isinstance(error["code"], bool), answer
        assert isinstance(error["message"], str), answer
        assert error["message"], answer
        assert set(error) <= {"code", "message", "data"}, answer


def assert_result(answer: Any, id: Any) -> Any:
    assert_response_shape(answer)
    assert answer["id"] == id, answer
    assert "result" in answer, answer
    return answer["result"]


def assert_error(answer: Any, code: int, id: Any = None) -> None:
    assert_response_shape(answer)
    assert answer["id"] == id, answer
    assert answer["error"]["code"] == code, answer


def batch_answers(body: Any) -> list[dict[str, Any]]:
    """Check a batch answer is a non-empty array of response objects; return it."""
    assert isinstance(body, list), body
    assert body, body
    for answer in body:
        assert_response_shape(answer)
    return body


def by_id(answers: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Index the answers with a non-null id; each such id must be answered once."""
    ids = [answer["id"] for answer in answers if answer["id"] is not None]
    assert len(ids) == len(set(ids)), answers
    return {answer["id"]: answer for answer in answers if answer["id"] is not None}


# --- rpc call with positional parameters ------------------------------------------------


async def test_call_with_positional_parameters(
    post: PostRaw, world: World, create_purchase: CreatePurchase
) -> None:
    # --> {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}
    # <-- {"jsonrpc": "2.0", "result": 19, "id": 1}
    first = await create_purchase("python-basics")
    second = await create_purchase("sql-fundamentals")
    for id_, purchase in ((1, first), (2, second)):
        body = (
            '{"jsonrpc": "2.0", "method": "purchase.get", "params": ["'
            + purchase["purchase_id"]
            + '"], "id": '
            + str(id_)
            + "}"
        )
        reply = await post(body, token=world.alice.token)
        assert reply.status == 200
        assert set(reply.json) == {"jsonrpc", "result", "id"}
        assert assert_result(reply.json, id_) == purchase


async def test_positional_parameters_keep_their_order(post: PostRaw, world: World) -> None:
    # Like subtract [42, 23] vs [23, 42]: the position decides which param a value is.
    token = world.alice.token
    in_order = (
        await post(
            '{"jsonrpc":"2.0","method":"purchase.create",'
            '"params":["python-basics","key-1"],"id":1}',
            token=token,
        )
    ).json
    created = assert_result(in_order, 1)
    assert created["course"] == "python-basics"

    # The same two values swapped: "key-1" is now the course, which does not exist.
    swapped = (
        await post(
            '{"jsonrpc":"2.0","method":"purchase.create",'
            '"params":["key-1","python-basics"],"id":2}',
            token=token,
        )
    ).json
    assert_error(swapped, 404, 2)


# --- rpc call with named parameters -----------------------------------------------------


async def test_call_with_named_parameters_in_any_order(post: PostRaw, world: World) -> None:
    # --> {"jsonrpc": "2.0", "method": "subtract",
    #      "params": {"subtrahend": 23, "minuend": 42}, "id": 3}
    # --> {"jsonrpc": "2.0", "method": "subtract",
    #      "params": {"minuend": 42, "subtrahend": 23}, "id": 4}
    # <-- the same result for both
    token = world.alice.token
    first = (
        await post(
            '{"jsonrpc": "2.0", "method": "purchase.create", '
            '"params": {"course": "sql-fundamentals", "idempotency_key": "named-1"}, "id": 3}',
            token=token,
        )
    ).json
    second = (
        await post(
            '{"jsonrpc": "2.0", "method": "purchase.create", '
            '"params": {"idempotency_key": "named-1", "course": "sql-fundamentals"}, "id": 4}',
            token=token,
        )
    ).json
    created = assert_result(first, 3)
    replayed = assert_result(second, 4)
    assert created["course"] == "sql-fundamentals"
    assert replayed == created

    named_get = (
        await post(
            '{"jsonrpc":"2.0","method":"purchase.get","params":{"purchase_id":"'
            + created["purchase_id"]
            + '"},"id":5}',
            token=token,
        )
    ).json
    assert assert_result(named_get, 5) == created


# --- a notification ---------------------------------------------------------------------


async def test_notifications_get_no_answer(post: PostRaw, rpc: RpcCall, world: World) -> None:
    # --> {"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}
    # --> {"jsonrpc": "2.0", "method": "foobar"}
    token = world.alice.token
    update = await post(
        '{"jsonrpc": "2.0", "method": "purchase.create", "params": ["python-basics"]}',
        token=token,
    )
    assert (update.status, update.text) == (204, "")
    foobar = await post('{"jsonrpc": "2.0", "method": "foobar"}', token=token)
    assert (foobar.status, foobar.text) == (204, "")

    # The notification ran although nobody heard of it.
    listed = (await rpc("purchase.list", token=token))["result"]["items"]
    assert [purchase["course"] for purchase in listed] == ["python-basics"]


# --- rpc call of non-existent method ----------------------------------------------------


async def test_call_of_nonexistent_method(post: PostRaw) -> None:
    # --> {"jsonrpc": "2.0", "method": "foobar", "id": "1"}
    # <-- {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"},
    #      "id": "1"}
    reply = await post('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert reply.status == 200
    assert_error(reply.json, METHOD_NOT_FOUND, "1")
    assert reply.json["error"]["message"] == "Method not found"


# --- rpc call with invalid JSON ---------------------------------------------------------


async def test_call_with_invalid_json(post: PostRaw, row_counts: Counts, world: World) -> None:
    # --> {"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]
    # <-- {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}
    before = await row_counts()
    reply = await post(
        '{"jsonrpc": "2.0", "method": "purchase.create, "params": "bar", "baz]',
        token=world.alice.token,
    )
    assert reply.status == 200
    assert_error(reply.json, PARSE_ERROR, None)
    assert reply.json["error"]["message"] == "Parse error"
    assert await row_counts() == before


# --- rpc call with invalid Request object -----------------------------------------------


async def test_call_with_invalid_request_object(post: PostRaw) -> None:
    # --> {"jsonrpc": "2.0", "method": 1, "params": "bar"}
    # <-- {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
    #      "id": null}
    reply = await post('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert reply.status == 200
    assert isinstance(reply.json, dict)
    assert_error(reply.json, INVALID_REQUEST, None)
    assert reply.json["error"]["message"] == "Invalid Request"


# --- rpc call Batch, invalid JSON -------------------------------------------------------


async def test_batch_with_invalid_json_is_one_parse_error(
    post: PostRaw, row_counts: Counts, world: World
) -> None:
    # --> [
    #       {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
    #       {"jsonrpc": "2.0", "method"
    #     ]
    # <-- {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}
    before = await row_counts()
    reply = await post(
        '[\n  {"jsonrpc": "2.0", "method": "purchase.create", "params": ["python-basics"],'
        ' "id": "1"},\n  {"jsonrpc": "2.0", "method"\n]',
        token=world.alice.token,
    )
    assert reply.status == 200
    assert isinstance(reply.json, dict)  # one object, not an array
    assert_error(reply.json, PARSE_ERROR, None)
    assert await row_counts() == before  # the well-formed first item did not run


# --- rpc call with an empty Array -------------------------------------------------------


async def test_batch_that_is_an_empty_array(post: PostRaw) -> None:
    # --> []
    # <-- {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
    #      "id": null}
    reply = await post("[]")
    assert reply.status == 200
    assert isinstance(reply.json, dict)
    assert_error(reply.json, INVALID_REQUEST, None)


# --- rpc call with an invalid Batch (but not empty) -------------------------------------


async def test_batch_of_one_invalid_item(post: PostRaw) -> None:
    # --> [1]
    # <-- [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
    #       "id": null}]
    reply = await post("[1]")
    assert reply.status == 200
    [answer] = batch_answers(reply.json)
    assert_error(answer, INVALID_REQUEST, None)


# --- rpc call with invalid Batch --------------------------------------------------------


async def test_batch_of_three_invalid_items(post: PostRaw) -> None:
    # --> [1,2,3]
    # <-- three Invalid Request objects with id null, in an array
    reply = await post("[1,2,3]")
    assert reply.status == 200
    answers = batch_answers(reply.json)
    assert len(answers) == 3
    for answer in answers:
        assert_error(answer, INVALID_REQUEST, None)
        assert answer["error"]["message"] == "Invalid Request"


# --- rpc call Batch ---------------------------------------------------------------------


async def test_mixed_batch(
    post: PostRaw, rpc: RpcCall, world: World, create_purchase: CreatePurchase
) -> None:
    # --> [
    #       {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
    #       {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
    #       {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
    #       {"foo": "boo"},
    #       {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
    #       {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    #     ]
    # <-- answers for "1", "2" and "9", Invalid Request (id null), Method not found ("5")
    token = world.alice.token
    existing = await create_purchase("python-basics")
    body = (
        "[\n"
        '  {"jsonrpc": "2.0", "method": "purchase.get", "params": ["'
        + existing["purchase_id"]
        + '"], "id": "1"},\n'
        '  {"jsonrpc": "2.0", "method": "purchase.create", "params": ["sql-fundamentals"]},\n'
        '  {"jsonrpc": "2.0", "method": "purchase.create", '
        '"params": ["python-basics", "batch-2"], "id": "2"},\n'
        '  {"foo": "boo"},\n'
        '  {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},\n'
        '  {"jsonrpc": "2.0", "method": "course.list", "id": "9"}\n'
        "]"
    )
    reply = await post(body, token=token)
    assert reply.status == 200
    answers = batch_answers(reply.json)
    assert len(answers) == 5  # the notification is not answered

    answered = by_id(answers)
    assert set(answered) == {"1", "2", "5", "9"}
    assert assert_result(answered["1"], "1") == existing
    created = assert_result(answered["2"], "2")
    assert created["course"] == "python-basics"
    assert created["state"] == "pending"
    assert_error(answered["5"], METHOD_NOT_FOUND, "5")
    courses = assert_result(answered["9"], "9")
    assert [course["slug"] for course in courses] == ["python-basics", "sql-fundamentals"]

    [invalid] = [answer for answer in answers if answer["id"] is None]
    assert_error(invalid, INVALID_REQUEST, None)

    # The notification in the batch ran: alice now holds three purchases.
    listed = (await rpc("purchase.list", token=token))["result"]["items"]
    assert Counter(purchase["course"] for purchase in listed) == Counter(
        {"python-basics": 2, "sql-fundamentals": 1}
    )


# --- rpc call Batch (all notifications) -------------------------------------------------


async def test_batch_of_only_notifications(post: PostRaw, rpc: RpcCall, world: World) -> None:
    # --> [
    #       {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
    #       {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    #     ]
    # <-- Nothing is returned for all notification batches
    token = world.alice.token
    reply = await post(
        "[\n"
        '  {"jsonrpc": "2.0", "method": "purchase.create", "params": ["sql-fundamentals"]},\n'
        '  {"jsonrpc": "2.0", "method": "foobar", "params": [7]}\n'
        "]",
        token=token,
    )
    assert (reply.status, reply.text) == (204, "")
    listed = (await rpc("purchase.list", token=token))["result"]["items"]
    assert [purchase["course"] for purchase in listed] == ["sql-fundamentals"]
