"""The server as users' Python code sees it: requests built, answers parsed by jsonrpcclient."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from jsonrpcclient import Error, Ok, notification, parse, request, request_json

from tests.conftest import FRONTEND_URL, World
from tests.e2e.conftest import bearer
from tests.payments import proof_for


async def call(client: TestClient[Any, Any], body: Any, token: str | None = None) -> Any:
    headers = bearer(token) if token else {}
    if isinstance(body, str):
        response = await client.post(
            "/rpc", data=body, headers={"Content-Type": "application/json", **headers}
        )
    else:
        response = await client.post("/rpc", json=body, headers=headers)
    assert response.status == 200
    return await response.json()


async def test_single_call(client: TestClient[Any, Any], world: World) -> None:
    sent = request("course.list")
    answer = parse(await call(client, sent))
    assert isinstance(answer, Ok)
    assert answer.id == sent["id"]
    assert [c["slug"] for c in answer.result] == ["python-basics", "sql-fundamentals"]


async def test_request_json_with_named_and_positional_params(
    client: TestClient[Any, Any], world: World
) -> None:
    token = world.alice.token
    created = parse(
        await call(client, request_json("purchase.create", {"course": "python-basics"}), token)
    )
    assert isinstance(created, Ok)
    purchase_id = created.result["purchase_id"]

    got = parse(await call(client, request("purchase.get", (purchase_id,)), token))
    assert isinstance(got, Ok)
    assert got.result == created.result

    # The payment step's signed event goes along as the proof, by position and by name.
    proof = proof_for(created.result)
    fulfilled = parse(
        await call(
            client, request_json("purchase.fulfill", (purchase_id, "fulfilled", "", proof)), token
        )
    )
    assert isinstance(fulfilled, Ok)
    assert fulfilled.result["redirect_url"] == f"{FRONTEND_URL}/courses/python-basics/start"
    named = {"purchase_id": purchase_id, "purchase_state": "fulfilled", "payment_proof": proof}
    again = parse(await call(client, request_json("purchase.fulfill", named), token))
    assert isinstance(again, Ok)
    assert again.result == fulfilled.result


async def test_batch_of_requests_and_a_notification(
    client: TestClient[Any, Any], world: World
) -> None:
    token = world.alice.token
    create = request("purchase.create", {"course": "sql-fundamentals"}, id="create")
    missing = request("purchase.get", {"purchase_id": "0" * 32}, id="missing")
    unknown = request("purchase.refund", ("x",), id="unknown")
    invalid = request("purchase.list", {"limit": 0}, id="invalid")
    courses = request("course.list", id="courses")
    ping = notification("course.list")

    answers = list(
        parse(await call(client, [create, missing, unknown, invalid, courses, ping], token))
    )

    by_id = {answer.id: answer for answer in answers}
    assert set(by_id) == {"create", "missing", "unknown", "invalid", "courses"}
    assert isinstance(by_id["create"], Ok)
    assert by_id["create"].result["course"] == "sql-fundamentals"
    assert isinstance(by_id["courses"], Ok)
    assert len(by_id["courses"].result) == 2

    assert isinstance(by_id["missing"], Error)
    assert by_id["missing"].code == 404
    assert by_id["missing"].data == {"purchase_id": "0" * 32}
    assert isinstance(by_id["unknown"], Error)
    assert by_id["unknown"].code == -32601
    assert isinstance(by_id["invalid"], Error)
    assert by_id["invalid"].code == -32602
    assert "limit" in by_id["invalid"].data


async def test_errors_parse_as_error(client: TestClient[Any, Any], world: World) -> None:
    unauthenticated = parse(await call(client, request("registration.list")))
    assert isinstance(unauthenticated, Error)
    assert unauthenticated.code == 401

    token = world.alice.token
    created = parse(await call(client, request("purchase.create", ("python-basics",)), token))
    assert isinstance(created, Ok)
    purchase_id = created.result["purchase_id"]
    unpaid = parse(
        await call(client, request("purchase.fulfill", (purchase_id, "fulfilled")), token)
    )
    assert isinstance(unpaid, Error)
    assert unpaid.code == 402
    assert unpaid.message.startswith("Payment not verified")
    assert unpaid.data == {"reason": "missing"}
    parse(await call(client, request("purchase.fulfill", (purchase_id, "canceled")), token))
    conflict = parse(
        await call(client, request("purchase.fulfill", (purchase_id, "fulfilled")), token)
    )
    assert isinstance(conflict, Error)
    assert conflict.code == 409
    assert conflict.data == {"current_state": "canceled", "requested_state": "fulfilled"}


async def test_notification_gets_no_answer(client: TestClient[Any, Any], world: World) -> None:
    response = await client.post(
        "/rpc",
        json=notification("purchase.create", {"course": "python-basics"}),
        headers=bearer(world.alice.token),
    )
    assert response.status == 204
    assert await response.read() == b""
    listed = parse(await call(client, request("purchase.list"), world.alice.token))
    assert isinstance(listed, Ok)
    assert len(listed.result["items"]) == 1
