"""Ambiguous credentials: a request with two Authorization headers has every call answered
401 (even calls that need no token), runs nothing, and is counted as anonymous."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from rpc_server.config import Settings
from tests.conftest import World
from tests.e2e.conftest import AppClientFactory, Counts, request_object

UNAUTHENTICATED = 401
RATE_LIMITED = 429


async def post_with(
    client: TestClient[Any, Any], body: Any, *authorizations: str
) -> tuple[int, Any]:
    headers = CIMultiDict([("Content-Type", "application/json")])
    for value in authorizations:
        headers.add("Authorization", value)
    response = await client.post("/rpc", data=json.dumps(body), headers=headers)
    text = await response.text()
    return response.status, json.loads(text) if text else None


EVERY_KIND_OF_CALL = [
    request_object("course.list", id=1),
    request_object("rpc.discover", id=2),
    request_object("purchase.list", id=3),
    request_object("purchase.create", {"course": "python-basics"}, id=4),
    request_object("registration.list", id=5),
    {"jsonrpc": "2.0", "method": "purchase.create", "params": {"course": "sql-fundamentals"}},
]


@pytest.mark.parametrize(
    "authorizations",
    [
        ("Bearer <alice>", "Bearer <bob>"),
        ("Bearer <alice>", "Bearer <alice>"),
        ("Bearer <alice>", "Basic YWxpY2U6c2VjcmV0"),
        ("Bearer rpcs_garbage", "Bearer <alice>"),
    ],
    ids=["two-users", "same-token-twice", "bearer-and-basic", "garbage-and-valid"],
)
async def test_two_authorization_headers_answer_401_to_every_call(
    client: TestClient[Any, Any],
    world: World,
    row_counts: Counts,
    authorizations: tuple[str, str],
) -> None:
    counts = await row_counts()
    values = [
        a.replace("<alice>", world.alice.token).replace("<bob>", world.bob.token)
        for a in authorizations
    ]
    status, answers = await post_with(client, EVERY_KIND_OF_CALL, *values)
    assert status == 200
    assert sorted(a["id"] for a in answers) == [1, 2, 3, 4, 5]  # the notification: silent
    for answer in answers:
        assert "result" not in answer, answer
        assert answer["error"]["code"] == UNAUTHENTICATED
        assert "more than one Authorization header" in answer["error"]["message"]
    assert await row_counts() == counts  # nothing ran, not even the notification


async def test_one_authorization_header_still_works(
    client: TestClient[Any, Any], world: World
) -> None:
    status, answers = await post_with(client, EVERY_KIND_OF_CALL[:3], f"Bearer {world.alice.token}")
    assert status == 200 and all("result" in a for a in answers)
    status, answers = await post_with(client, EVERY_KIND_OF_CALL[:2])  # none: anonymous
    assert status == 200 and all("result" in a for a in answers)


async def test_ambiguous_requests_are_counted_as_anonymous(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    client = await app_client(
        settings=dataclasses.replace(
            settings, rate_limit=1.0, rate_burst=100, anonymous_rate_limit=1.0,
            anonymous_rate_burst=2,
        )
    )  # fmt: skip
    alice = f"Bearer {world.alice.token}"
    batch = [request_object("purchase.list", id=i) for i in range(3)]
    _, answers = await post_with(client, batch, alice, alice)
    codes = [a["error"]["code"] for a in sorted(answers, key=lambda a: a["id"])]
    assert codes == [UNAUTHENTICATED, UNAUTHENTICATED, RATE_LIMITED]  # the address's 2
    _, answers = await post_with(client, batch, alice)  # alice's own bucket is untouched
    assert all("result" in a for a in answers)
