"""Fixtures of the end-to-end tests: raw HTTP posts, row counts, apps with own settings.

The shared fixtures (``client``, ``rpc``, ``world``, ``engine``) live in ``tests/conftest.py``;
these add what tests over the wire need besides: sending bodies byte for byte, reading
how many rows each table holds, and building an app with other settings or methods.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.jsonrpc.registry import MethodRegistry
from rpc_server.methods import REGISTRY
from tests.conftest import RpcCall, World
from tests.payments import proof_for

# The error codes of the contract (README, "Errors"), written here once and on purpose
# not imported from the code they check.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVICE_UNAVAILABLE = -32000
TIMED_OUT = -32001
PAYMENT_NOT_VERIFIED = 402


def assert_error(answer: Any, code: int, id: Any = None) -> dict[str, Any]:
    """Check one error response object; return its error member."""
    assert isinstance(answer, dict), answer
    assert answer["jsonrpc"] == "2.0", answer
    assert "result" not in answer, answer
    assert answer["id"] == id, answer
    assert answer["error"]["code"] == code, answer
    assert isinstance(answer["error"]["message"], str), answer
    assert answer["error"]["message"], answer
    error: dict[str, Any] = answer["error"]
    return error


# The tables a call may write to; a rejected call must leave all of them as they were.
WRITTEN_TABLES = ("purchases", "course_registrations", "receipt_outbox")


@dataclass(frozen=True)
class Reply:
    """One HTTP answer from ``POST /rpc``: status, raw text and (if any) the parsed JSON."""

    status: int
    text: str
    content_type: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


PostRaw = Callable[..., Awaitable[Reply]]


def request_object(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    """Return a JSON-RPC 2.0 request object (without params when ``params`` is None)."""
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


def notification_object(method: str, params: Any = None) -> dict[str, Any]:
    request = request_object(method, params)
    del request["id"]
    return request


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def send(
    client: TestClient[Any, Any],
    body: bytes | str | Any,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST ``body`` to /rpc: bytes and str go as they are, anything else as JSON."""
    all_headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
    all_headers.update(headers or {})
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    response = await client.post("/rpc", data=data, headers=all_headers)
    return Reply(response.status, await response.text(), response.content_type)


@pytest.fixture
def post(client: TestClient[Any, Any]) -> PostRaw:
    """``await post(body, token=..., headers=...)``: one raw POST /rpc, answer unparsed."""

    async def call(body: Any, **kwargs: Any) -> Reply:
        return await send(client, body, **kwargs)

    return call


Counts = Callable[[], Awaitable[dict[str, int]]]


@pytest.fixture
def row_counts(engine: AsyncEngine) -> Counts:
    """``await row_counts()``: how many rows each written table holds right now."""

    async def count() -> dict[str, int]:
        async with engine.connect() as connection:
            return {
                table: (
                    await connection.execute(text(f"SELECT count(*) FROM {table}"))
                ).scalar_one()
                for table in WRITTEN_TABLES
            }

    return count


@pytest.fixture
def purchase_rows(engine: AsyncEngine) -> Callable[[str], Awaitable[dict[str, int]]]:
    """``await purchase_rows(purchase_id)``: registrations and receipts of one purchase."""

    async def count(purchase_id: str) -> dict[str, int]:
        async with engine.connect() as connection:
            result: dict[str, int] = {}
            for table in ("course_registrations", "receipt_outbox"):
                result[table] = (
                    await connection.execute(
                        text(
                            f"SELECT count(*) FROM {table} JOIN purchases "
                            f"ON purchases.id = {table}.purchase_id "
                            "WHERE purchases.purchase_id = :purchase_id"
                        ),
                        {"purchase_id": purchase_id},
                    )
                ).scalar_one()
            return result

    return count


AppClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def app_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> AppClientFactory:
    """``await app_client(settings=..., registry=...)``: a client over an app of one's own."""

    async def build(
        *, settings: Settings = settings, registry: MethodRegistry = REGISTRY
    ) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(settings, registry))

    return build


CreatePurchase = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def create_purchase(rpc: RpcCall, world: World) -> CreatePurchase:
    """``await create_purchase(course=..., token=...)``: a new purchase, as serialized."""

    async def create(
        course: str = "python-basics", *, token: str | None = None, **params: Any
    ) -> dict[str, Any]:
        body = await rpc(
            "purchase.create", {"course": course, **params}, token=token or world.alice.token
        )
        assert "result" in body, body
        result: dict[str, Any] = body["result"]
        return result

    return create


Fulfil = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def fulfil(rpc: RpcCall, world: World) -> Fulfil:
    """``await fulfil(purchase, token=...)``: pay for a purchase and fulfil it, as a buyer does.

    ``purchase`` is a purchase as serialized, or its purchase_id (then read with the
    payments token, which sees every purchase). The call carries a fresh signed
    ``payment_proof`` for it (``tests.payments.proof_for``; keyword arguments such as
    ``payment_ref`` go to it); the token is alice's unless given. Returns the result,
    ``{redirect_url, purchase}``.
    """

    async def pay_and_fulfil(
        purchase: dict[str, Any] | str, *, token: str | None = None, **proof: Any
    ) -> dict[str, Any]:
        if isinstance(purchase, str):
            body = await rpc("purchase.get", [purchase], token=world.payments.token)
            assert "result" in body, body
            purchase = body["result"]
        assert isinstance(purchase, dict)
        params = {
            "purchase_id": purchase["purchase_id"],
            "purchase_state": "fulfilled",
            "payment_proof": proof_for(purchase, **proof),
        }
        body = await rpc("purchase.fulfill", params, token=token or world.alice.token)
        assert "result" in body, body
        result: dict[str, Any] = body["result"]
        return result

    return pay_and_fulfil


Events = Callable[..., Awaitable[list[dict[str, Any]]]]


@pytest.fixture
def purchase_events(rpc: RpcCall, world: World) -> Events:
    """``await purchase_events(purchase_id, token=...)``: its history (``purchase.events``),
    read with the staff token unless another is given."""

    async def history(purchase_id: str, *, token: str | None = None) -> list[dict[str, Any]]:
        body = await rpc("purchase.events", [purchase_id], token=token or world.staff.token)
        assert "result" in body, body
        events: list[dict[str, Any]] = body["result"]
        return events

    return history
