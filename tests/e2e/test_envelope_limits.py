"""The envelope's limits, each at its edge: body size (as sent and as decoded from gzip or
deflate), batch length, JSON depth, ids beyond 64 bits, the per-call timeout, and a full
batch answered item for item.

Every limit is checked on an app built from a settings variant (``dataclasses.replace``)
so a test says which limit it exercises; the defaults are checked where cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gzip
import json
import re
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rpc_server.config import Settings
from rpc_server.domain.records import Actor
from rpc_server.domain.services import new_purchase_id, utcnow
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import REGISTRY
from schemas.base import Out, Params
from tests.conftest import RpcCall, World
from tests.e2e.conftest import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TIMED_OUT,
    AppClientFactory,
    Counts,
    CreatePurchase,
    PostRaw,
    assert_error,
    notification_object,
    request_object,
    send,
)


def padded(payload: Any, size: int) -> bytes:
    """``payload`` as JSON, padded with trailing spaces to exactly ``size`` bytes."""
    encoded = json.dumps(payload).encode()
    assert len(encoded) <= size
    return encoded + b" " * (size - len(encoded))


# --- body size --------------------------------------------------------------------------

BODY_LIMIT = 2048


@pytest.fixture
async def small_body_client(
    app_client: AppClientFactory, settings: Settings
) -> TestClient[Any, Any]:
    return await app_client(settings=dataclasses.replace(settings, max_body_bytes=BODY_LIMIT))


async def test_batch_body_of_exactly_the_limit_is_answered(
    small_body_client: TestClient[Any, Any], world: World
) -> None:
    batch = [request_object("course.list", id=i) for i in range(3)]
    reply = await send(small_body_client, padded(batch, BODY_LIMIT))
    assert reply.status == 200
    assert sorted(answer["id"] for answer in reply.json) == [0, 1, 2]


async def test_body_one_byte_over_is_413_and_the_client_keeps_being_served(
    small_body_client: TestClient[Any, Any], world: World, row_counts: Counts
) -> None:
    before = await row_counts()
    create = request_object("purchase.create", {"course": "python-basics"}, id="over")
    for _ in range(3):  # the same client, so the same keep-alive connection where possible
        over = await send(
            small_body_client, padded(create, BODY_LIMIT + 1), token=world.alice.token
        )
        assert over.status == 413
        assert over.content_type == "application/json"
        assert_error(over.json, INVALID_REQUEST, None)  # the id is never read

        at_limit = await send(
            small_body_client, padded(request_object("course.list", id=2), BODY_LIMIT)
        )
        assert at_limit.status == 200
        assert at_limit.json["id"] == 2
        assert len(at_limit.json["result"]) == 2
    assert await row_counts() == before  # nothing of an oversized body ran


async def _chunks(body: bytes, size: int = 300) -> AsyncIterator[bytes]:
    """Yield ``body`` in pieces: sent with chunked transfer encoding, no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]
        await asyncio.sleep(0)


@pytest.mark.parametrize("size", [BODY_LIMIT + 1, 10 * BODY_LIMIT, 3 * 1024 * 1024])
async def test_chunked_body_over_the_limit_is_413_and_serving_goes_on(
    small_body_client: TestClient[Any, Any], world: World, row_counts: Counts, size: int
) -> None:
    before = await row_counts()
    create = request_object("purchase.create", {"course": "python-basics"}, id=1)
    response = await small_body_client.post(
        "/rpc",
        data=_chunks(padded(create, size), 64 * 1024 if size > 100_000 else 300),
        headers={"Authorization": f"Bearer {world.alice.token}"},
    )
    assert "Content-Length" not in response.request_info.headers
    assert response.status == 413
    assert_error(await response.json(), INVALID_REQUEST, None)
    assert await row_counts() == before

    after = await send(small_body_client, request_object("course.list", id=3))
    assert after.status == 200
    assert after.json["id"] == 3


async def test_chunked_body_within_the_limit_is_answered(
    small_body_client: TestClient[Any, Any], world: World
) -> None:
    response = await small_body_client.post(
        "/rpc", data=_chunks(padded(request_object("course.list", id=4), BODY_LIMIT), 100)
    )
    assert response.status == 200
    body = await response.json()
    assert body["id"] == 4
    assert len(body["result"]) == 2


# --- Content-Encoding: gzip and deflate decoded, the limit on the decoded size --------


def gzip_members(body: bytes) -> bytes:
    """``body`` as two gzip members in a row (RFC 1952 allows any number)."""
    half = len(body) // 2
    return gzip.compress(body[:half]) + gzip.compress(body[half:])


def raw_deflate(body: bytes) -> bytes:
    """RFC 1951 data without the zlib wrapper, as some clients send for "deflate"."""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


ENCODINGS = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "upper-case": ("GZIP", gzip.compress),
    "gzip-members": ("gzip", gzip_members),
    "deflate": ("deflate", zlib.compress),
    "raw-deflate": ("deflate", raw_deflate),
    "identity-too": ("identity, gzip", gzip.compress),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("encoding", ENCODINGS.values(), ids=ENCODINGS.keys())
async def test_encoded_body_is_decoded_whole(
    post: PostRaw,
    client: TestClient[Any, Any],
    world: World,
    row_counts: Counts,
    encoding: tuple[str, Callable[[bytes], bytes]],
    chunked: bool,
) -> None:
    """The whole decoded body is read, not as many bytes as were sent (the compressed
    Content-Length), and its calls run."""
    name, encode = encoding
    before = await row_counts()
    batch = [
        request_object("purchase.create", {"course": "python-basics"}, id="a"),
        request_object("course.list", id="b"),
    ]
    body = encode(padded(batch, 4000))
    assert len(body) < 1000
    headers = {"Content-Encoding": name, "Authorization": f"Bearer {world.alice.token}"}
    response = await client.post(
        "/rpc", data=_chunks(body, 100) if chunked else body, headers=headers
    )
    assert ("Content-Length" in response.request_info.headers) is not chunked
    assert response.status == 200
    answers = {answer["id"]: answer for answer in await response.json()}
    assert answers["a"]["result"]["state"] == "pending"
    assert len(answers["b"]["result"]) == 2
    after = await row_counts()
    assert after["purchases"] == before["purchases"] + 1


async def test_encoded_body_decoding_to_the_limit_is_answered_one_byte_more_is_413(
    small_body_client: TestClient[Any, Any], world: World, row_counts: Counts
) -> None:
    before = await row_counts()
    create = request_object("purchase.create", {"course": "python-basics"}, id="over")
    for encoding, encode in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        headers = {"Content-Encoding": encoding, "Authorization": f"Bearer {world.alice.token}"}
        at_limit = padded(request_object("course.list", id=1), BODY_LIMIT)
        reply = await send(small_body_client, encode(at_limit), headers=headers)
        assert reply.status == 200
        assert len(reply.json["result"]) == 2

        reply = await send(
            small_body_client, encode(padded(create, BODY_LIMIT + 1)), headers=headers
        )
        assert reply.status == 413
        assert reply.content_type == "application/json"
        assert_error(reply.json, INVALID_REQUEST, None)
    assert await row_counts() == before


@functools.cache
def zip_bomb(decoded_size: int) -> bytes:
    """Zeros, gzip-compressed about a thousand to one, built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(decoded_size // len(zeros))]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_zip_bomb_is_refused_without_being_inflated(
    client: TestClient[Any, Any], settings: Settings, world: World, chunked: bool
) -> None:
    """256 MiB of zeros in about 250 KB, under the 1 MiB limit as sent: refused with 413
    once the decoded size passes the limit, with no more than that decoded."""
    bomb = zip_bomb(256 * 1024 * 1024)
    assert len(bomb) < settings.max_body_bytes
    tracemalloc.start()
    try:
        response = await client.post(
            "/rpc",
            data=_chunks(bomb, 64 * 1024) if chunked else bomb,
            headers={"Content-Encoding": "gzip"},
        )
        status, body = response.status, await response.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert_error(body, INVALID_REQUEST, None)
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated while answering"

    after = await send(client, request_object("course.list", id=3))
    assert after.status == 200
    assert after.json["id"] == 3


UNDECODABLE = {
    "not-gzip": ("gzip", b'{"jsonrpc":"2.0","method":"course.list","id":1}'),
    "truncated": ("gzip", gzip.compress(padded(request_object("course.list"), 500))[:-12]),
    "trailing-bytes": ("deflate", zlib.compress(b'{"jsonrpc":"2.0"}') + b"junk"),
    "gzip-then-junk": ("gzip", gzip.compress(b"{}") + b"\x00junk"),
    "not-deflate": ("deflate", b"\xff" * 64),
    "empty": ("gzip", b""),
}


@pytest.mark.parametrize("encoding,body", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_body_that_does_not_decode_is_a_400_parse_error_never_a_500(
    post: PostRaw, world: World, row_counts: Counts, encoding: str, body: bytes
) -> None:
    before = await row_counts()
    reply = await post(body, headers={"Content-Encoding": encoding})
    assert reply.status == 400
    assert reply.content_type == "application/json"
    error = assert_error(reply.json, PARSE_ERROR, None)
    assert error["data"] == f"The body is not valid {encoding} data."
    assert await row_counts() == before

    after = await post(request_object("course.list", id=2))
    assert after.status == 200


@pytest.mark.parametrize(
    "encoding",
    ["br", "zstd", "compress", "gzip, gzip", "deflate, gzip", "gzip;q=1", "x-SECRET-coding"],
)
async def test_other_content_encodings_are_415_with_what_we_accept(
    client: TestClient[Any, Any], world: World, row_counts: Counts, encoding: str
) -> None:
    """Refused whole, even when the body happens to be plain JSON: the request says it is
    something we cannot read."""
    before = await row_counts()
    response = await client.post(
        "/rpc",
        json=request_object("purchase.create", {"course": "python-basics"}),
        headers={"Content-Encoding": encoding, "Authorization": f"Bearer {world.alice.token}"},
    )
    text = await response.text()
    assert response.status == 415
    assert response.headers["Accept-Encoding"] == "gzip, deflate"
    assert response.content_type == "application/json"
    assert_error(json.loads(text), INVALID_REQUEST, None)
    assert "SECRET" not in text
    assert await row_counts() == before


# --- batch length -----------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 100])
async def test_batch_of_exactly_the_limit_is_answered_one_more_is_rejected_whole(
    app_client: AppClientFactory, settings: Settings, limit: int
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_batch_length=limit))

    at_limit = [request_object("foobar", id=i) for i in range(limit)]
    answers = (await send(client, at_limit)).json
    assert isinstance(answers, list)
    assert sorted(answer["id"] for answer in answers) == list(range(limit))
    for answer in answers:
        assert_error(answer, METHOD_NOT_FOUND, answer["id"])

    over = [request_object("foobar", id=i) for i in range(limit + 1)]
    reply = await send(client, over)
    assert reply.status == 200
    assert isinstance(reply.json, dict)  # one object, not an array
    error = assert_error(reply.json, INVALID_REQUEST, None)
    assert str(limit) in json.dumps(error["data"])


async def test_default_batch_limit_is_100_and_counts_notifications_and_junk(
    post: PostRaw,
) -> None:
    # 100 notifications are within the limit: nothing to answer.
    reply = await post([notification_object("foobar")] * 100)
    assert (reply.status, reply.text) == (204, "")

    # The length is checked before any item: 101 items of any kind are one error.
    for too_long in ([notification_object("foobar")] * 101, [1] * 101, [[]] * 101):
        reply = await post(too_long)
        assert reply.status == 200
        error = assert_error(reply.json, INVALID_REQUEST, None)
        assert "100" in json.dumps(error["data"])


async def test_rejected_long_batch_runs_none_of_its_notifications(
    app_client: AppClientFactory, settings: Settings, world: World, row_counts: Counts
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_batch_length=2))
    before = await row_counts()
    batch = [notification_object("purchase.create", {"course": "python-basics"})] * 3
    reply = await send(client, batch, token=world.alice.token)
    assert_error(reply.json, INVALID_REQUEST, None)
    assert await row_counts() == before


# --- JSON depth -------------------------------------------------------------------------


def nested_array(depth: int) -> Any:
    """A value of ``depth`` levels: 0 is a scalar, 1 is [], 2 is [[]], ..."""
    if depth == 0:
        return 0
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_object(depth: int) -> Any:
    """A value of ``depth`` levels made of objects: 1 is {}, 2 is {"a": {}}, ..."""
    if depth == 0:
        return 0
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_nesting_helpers_have_the_depth_they_claim() -> None:
    assert nested_array(0) == 0
    assert nested_array(1) == []
    assert nested_array(3) == [[[]]]
    assert nested_object(1) == {}
    assert nested_object(3) == {"a": {"a": {}}}


@pytest.mark.parametrize("limit", [4, 64])
@pytest.mark.parametrize("nest", [nested_array, nested_object], ids=["arrays", "objects"])
async def test_request_of_exactly_the_depth_limit_is_dispatched(
    app_client: AppClientFactory, settings: Settings, world: World, limit: int, nest: Any
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_json_depth=limit))
    # The request object is one level, so its params may be limit - 1 deep.
    reply = await send(client, request_object("course.list", nest(limit - 1), id=1))
    assert reply.status == 200
    # Parsed and dispatched: course.list takes no params, so these are invalid params.
    assert_error(reply.json, INVALID_PARAMS, 1)

    # In a batch the array is one more level.
    reply = await send(client, [request_object("course.list", nest(limit - 2), id=2)])
    assert reply.status == 200
    [answer] = reply.json
    assert_error(answer, INVALID_PARAMS, 2)


@pytest.mark.parametrize("limit", [4, 64])
@pytest.mark.parametrize("nest", [nested_array, nested_object], ids=["arrays", "objects"])
async def test_request_one_level_deeper_than_the_limit_is_a_parse_error(
    app_client: AppClientFactory, settings: Settings, world: World, limit: int, nest: Any
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_json_depth=limit))
    for body in (
        request_object("course.list", nest(limit), id=1),
        [request_object("course.list", nest(limit - 1), id=2)],
    ):
        reply = await send(client, body)
        assert reply.status == 200, reply.text
        assert isinstance(reply.json, dict)
        assert_error(reply.json, PARSE_ERROR, None)


async def test_depth_counts_anywhere_in_the_body(
    app_client: AppClientFactory, settings: Settings, world: World, row_counts: Counts
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, max_json_depth=5))
    before = await row_counts()
    create = request_object("purchase.create", {"course": "python-basics"}, id=1)
    for body in (
        # Six levels, in an unknown member of an otherwise valid request.
        {**create, "extra": nested_array(5)},
        # Six levels, in the second item of a batch whose first item is a valid call.
        [create, request_object("course.list", {"x": nested_object(3)}, id=2)],
        # Six levels, in a notification.
        notification_object("purchase.create", [nested_array(4)]),
    ):
        reply = await send(client, body, token=world.alice.token)
        assert reply.status == 200, body
        assert_error(reply.json, PARSE_ERROR, None)
    assert await row_counts() == before  # nothing in a rejected body ran


async def test_default_depth_limit_is_64(post: PostRaw) -> None:
    at_limit = await post("[" * 64 + "]" * 64)
    [answer] = at_limit.json  # a batch of one item, [[...]], which is not a request
    assert_error(answer, INVALID_REQUEST, None)

    over = await post("[" * 65 + "]" * 65)
    assert over.status == 200
    assert_error(over.json, PARSE_ERROR, None)


async def test_depth_limit_and_timeout_come_from_the_environment(
    app_client: AppClientFactory, database_url: str
) -> None:
    settings = Settings.from_env(
        {
            "RPC_SERVER_DATABASE_URL": database_url,
            "RPC_SERVER_MAX_JSON_DEPTH": "3",
            "RPC_SERVER_CALL_TIMEOUT": "0.2",
        }
    )
    assert (settings.max_json_depth, settings.call_timeout) == (3, 0.2)
    client = await app_client(settings=settings, registry=SLOW_REGISTRY)
    reply = await send(client, request_object("course.list", [[]], id=1))
    assert_error(reply.json, INVALID_PARAMS, 1)
    reply = await send(client, request_object("course.list", [[[]]], id=1))
    assert_error(reply.json, PARSE_ERROR, None)
    reply = await send(client, request_object("test.slow", id=3))
    assert assert_error(reply.json, TIMED_OUT, 3)["data"] == {"timeout_seconds": 0.2}


# --- ids beyond 64 bits -----------------------------------------------------------------

BIG_IDS = [2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1, -(2**64), 10**30]


# An id written as a float: with a fraction or an exponent.
FLOAT_ID = re.compile(r'"id"\s*:\s*-?[0-9]+(\.[0-9]+)?[eE.]')


def assert_big_id_kept_or_refused(text: str, answer: Any, big_id: int) -> None:
    """The id comes back digit for digit, or the request is refused as invalid."""
    assert not FLOAT_ID.search(text), text
    if answer["id"] is None:
        assert_error(answer, INVALID_REQUEST, None)
    else:
        assert answer["id"] == big_id
        assert type(answer["id"]) is int


@pytest.mark.parametrize("big_id", BIG_IDS, ids=str)
async def test_big_integer_id_is_echoed_exactly_or_refused(
    post: PostRaw, world: World, big_id: int
) -> None:
    for method, token in (
        ("course.list", None),
        ("foobar", None),
        ("purchase.get", None),  # 401
        ("purchase.get", world.alice.token),  # invalid params: no purchase_id
    ):
        reply = await post(f'{{"jsonrpc":"2.0","method":"{method}","id":{big_id}}}', token=token)
        assert reply.status == 200
        assert_big_id_kept_or_refused(reply.text, reply.json, big_id)
        if reply.json["id"] is not None:
            assert f'"id":{big_id}' in reply.text.replace(" ", "")


async def test_big_integer_ids_in_a_batch_are_echoed_exactly(post: PostRaw, world: World) -> None:
    body = (
        "["
        + ",".join(f'{{"jsonrpc":"2.0","method":"course.list","id":{i}}}' for i in BIG_IDS)
        + ',{"jsonrpc":"2.0","method":"course.list","id":1.5}'
        + ',{"jsonrpc":"2.0","method":"course.list","id":7}]'
    )
    reply = await post(body)
    assert reply.status == 200
    answers = reply.json
    assert len(answers) == len(BIG_IDS) + 2
    compact = reply.text.replace(" ", "")
    echoed = [answer["id"] for answer in answers if answer["id"] is not None]
    assert len(echoed) == len(set(echoed))
    assert {1.5, 7} <= set(echoed) <= {*BIG_IDS, 1.5, 7}
    for big_id in BIG_IDS:
        if big_id in echoed:
            assert f'"id":{big_id}' in compact
    assert not FLOAT_ID.search(compact.replace('"id":1.5', "")), compact
    refused = [answer for answer in answers if answer["id"] is None]
    assert len(refused) + len(echoed) == len(answers)
    for answer in refused:
        assert_error(answer, INVALID_REQUEST, None)


# --- per-call timeout -------------------------------------------------------------------


class NoParams(Params):
    """Takes no params."""


async def slow(ctx: RpcContext, actor: Actor | None) -> Any:
    """Takes far longer than any call may."""
    await asyncio.sleep(5)
    return {}


async def quick(ctx: RpcContext, actor: Actor | None) -> Any:
    """Takes a little time, well within the limit."""
    await asyncio.sleep(0.01)
    return {}


async def slow_write(ctx: RpcContext, actor: Actor) -> Any:
    """Writes a purchase, then stalls before committing."""
    async with ctx.uow(write=True) as uow:
        course = await uow.courses.get_by_slug("python-basics")
        assert course is not None
        await uow.purchases.add(
            purchase_id=new_purchase_id(),
            owner_id=actor.user_id,
            course=course,
            idempotency_key=None,
            now=utcnow(),
        )
        await asyncio.sleep(5)
        await uow.commit()
    return {}


SLOW_REGISTRY = MethodRegistry(
    [
        *REGISTRY.methods.values(),
        RpcMethod("test.slow", slow, NoParams, Out(), auth=False),
        RpcMethod("test.quick", quick, NoParams, Out(), auth=False),
        RpcMethod("test.slow_write", slow_write, NoParams, Out()),
    ]
)


@pytest.fixture
async def timeout_client(app_client: AppClientFactory, settings: Settings) -> TestClient[Any, Any]:
    return await app_client(
        settings=dataclasses.replace(settings, call_timeout=0.2), registry=SLOW_REGISTRY
    )


def assert_timed_out(answer: Any, id: Any, seconds: float = 0.2) -> None:
    error = assert_error(answer, TIMED_OUT, id)
    assert error["message"] == "Timed out"
    assert error["data"] == {"timeout_seconds": seconds}


async def test_call_running_past_the_timeout_is_timed_out(
    timeout_client: TestClient[Any, Any],
) -> None:
    started = time.monotonic()
    reply = await send(timeout_client, request_object("test.slow", id="slow"))
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert_timed_out(reply.json, "slow")
    assert 0.15 < elapsed < 3, elapsed


async def test_timed_out_item_leaves_the_rest_of_its_batch_alone(
    timeout_client: TestClient[Any, Any], world: World
) -> None:
    batch = [
        request_object("test.slow", id=1),
        request_object("test.quick", id=2),
        request_object("course.list", id=3),
        request_object("test.slow", id=4),
        notification_object("test.slow"),
        request_object("foobar", id=5),
    ]
    started = time.monotonic()
    reply = await send(timeout_client, batch)
    elapsed = time.monotonic() - started
    assert reply.status == 200
    answers = {answer["id"]: answer for answer in reply.json}
    assert len(reply.json) == 5
    assert set(answers) == {1, 2, 3, 4, 5}
    assert_timed_out(answers[1], 1)
    assert_timed_out(answers[4], 4)
    assert answers[2] == {"jsonrpc": "2.0", "result": {}, "id": 2}
    assert len(answers[3]["result"]) == 2
    assert_error(answers[5], METHOD_NOT_FOUND, 5)
    # The slow items ran side by side, each cut at the timeout.
    assert elapsed < 3, elapsed


async def test_slow_notification_is_not_answered_and_does_not_hang(
    timeout_client: TestClient[Any, Any],
) -> None:
    started = time.monotonic()
    reply = await send(timeout_client, notification_object("test.slow"))
    assert (reply.status, reply.text) == (204, "")
    assert time.monotonic() - started < 3


async def test_timed_out_call_rolls_back_and_releases_the_database(
    app_client: AppClientFactory,
    settings: Settings,
    world: World,
    row_counts: Counts,
    rpc: RpcCall,
) -> None:
    client = await app_client(
        settings=dataclasses.replace(settings, call_timeout=0.5), registry=SLOW_REGISTRY
    )
    before = await row_counts()
    reply = await send(client, request_object("test.slow_write", id=1), token=world.alice.token)
    assert_timed_out(reply.json, 1, 0.5)
    assert await row_counts() == before

    # The write lock the stalled call held is gone: a new purchase goes through.
    create = request_object("purchase.create", {"course": "python-basics"}, id=2)
    created = await send(client, create, token=world.alice.token)
    assert created.json["result"]["state"] == "pending"
    assert (await row_counts())["purchases"] == before["purchases"] + 1


# --- a full batch, answered item for item ----------------------------------------------


async def test_batch_of_100_gets_answers_every_id_with_its_own_result(
    post: PostRaw, world: World, create_purchase: CreatePurchase
) -> None:
    alices = [
        (await create_purchase(course, token=world.alice.token))
        for course in ("python-basics", "sql-fundamentals", "python-basics")
    ]
    bobs = [
        (await create_purchase(course, token=world.bob.token))
        for course in ("python-basics", "sql-fundamentals")
    ]
    unknown = ["0" * 32, "f" * 32, "nosuchpurchase", "1"]
    targets = [p["purchase_id"] for p in alices] + [p["purchase_id"] for p in bobs] + unknown
    expected: dict[Any, dict[str, Any] | None] = {}
    batch = []
    for index in range(100):
        id_: Any = index if index % 2 else f"get-{index}"
        purchase_id = targets[(index * 7) % len(targets)]
        batch.append(request_object("purchase.get", {"purchase_id": purchase_id}, id=id_))
        expected[id_] = next((p for p in alices if p["purchase_id"] == purchase_id), None)
    assert any(value is None for value in expected.values())
    assert sum(value is not None for value in expected.values()) > 20

    reply = await post(batch, token=world.alice.token)
    assert reply.status == 200
    answers = reply.json
    assert len(answers) == 100
    by_id = {answer["id"]: answer for answer in answers}
    assert set(by_id) == set(expected)
    for request in batch:
        answer = by_id[request["id"]]
        assert answer["jsonrpc"] == "2.0"
        purchase = expected[request["id"]]
        if purchase is None:
            # Unknown and other people's purchases look exactly alike: not found.
            error = assert_error(answer, 404, request["id"])
            assert error["data"] == {"purchase_id": request["params"]["purchase_id"]}
        else:
            assert "error" not in answer
            assert answer["result"] == purchase
