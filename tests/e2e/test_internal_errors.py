"""Failures inside the server: the client gets a code and an error id, never internals."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.exc import InterfaceError, OperationalError

from rpc_server.config import Settings
from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import REGISTRY
from schemas.base import Out, Params
from tests.conftest import World
from tests.e2e.conftest import (
    INTERNAL_ERROR,
    SERVICE_UNAVAILABLE,
    AppClientFactory,
    request_object,
    send,
)

SECRET = "secret internals"


class NoParams(Params):
    """Takes no params."""


async def explode(ctx: RpcContext, actor: Actor | None) -> Any:
    """Always fails with a message that must never reach a client."""
    raise RuntimeError(SECRET)


async def lose_database(ctx: RpcContext, actor: Actor | None) -> Any:
    """Fails the way a lost database connection does."""
    raise OperationalError(f"SELECT {SECRET}", {"password": SECRET}, Exception(SECRET))


async def lose_connection(ctx: RpcContext, actor: Actor | None) -> Any:
    """Fails the way a broken driver connection does."""
    raise InterfaceError(f"SELECT {SECRET}", None, Exception(SECRET))


async def explode_with_token(ctx: RpcContext, actor: Actor | None) -> Any:
    """Fails after authentication."""
    assert actor is not None
    raise KeyError(SECRET)


TEST_REGISTRY = MethodRegistry(
    [
        *REGISTRY.methods.values(),
        RpcMethod("test.explode", explode, NoParams, Out(), auth=False),
        RpcMethod("test.lose_database", lose_database, NoParams, Out(), auth=False),
        RpcMethod("test.lose_connection", lose_connection, NoParams, Out(), auth=False),
        RpcMethod("test.explode_with_token", explode_with_token, NoParams, Out()),
    ]
)


@pytest.fixture
async def failing_client(app_client: AppClientFactory) -> TestClient[Any, Any]:
    return await app_client(registry=TEST_REGISTRY)


def assert_no_internals(text: str) -> None:
    for leak in (SECRET, "RuntimeError", "OperationalError", "Traceback", "SELECT", "KeyError"):
        assert leak not in text, text


@pytest.mark.parametrize("method", ["test.explode", "test.explode_with_token"])
async def test_internal_error_gives_only_an_error_id_that_is_logged(
    failing_client: TestClient[Any, Any],
    world: World,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    with caplog.at_level(logging.ERROR):
        reply = await send(failing_client, request_object(method, id="x"), token=world.alice.token)

    assert reply.status == 200
    assert_no_internals(reply.text)
    body = reply.json
    assert body["id"] == "x"
    assert body["error"]["code"] == INTERNAL_ERROR
    assert body["error"]["message"] == "Internal error"
    data = body["error"]["data"]
    assert set(data) == {"error_id"}
    error_id = data["error_id"]
    assert isinstance(error_id, str)
    assert len(error_id) >= 16

    logged = [record for record in caplog.records if error_id in record.getMessage()]
    assert logged, caplog.text
    # The log keeps what the client does not get: the exception and its traceback.
    assert any(record.exc_info is not None for record in logged)
    assert SECRET in caplog.text


async def test_each_internal_error_gets_its_own_id(
    failing_client: TestClient[Any, Any], world: World
) -> None:
    batch = [request_object("test.explode", id=i) for i in range(3)]
    answers = (await send(failing_client, batch)).json
    error_ids = {answer["error"]["data"]["error_id"] for answer in answers}
    assert len(error_ids) == 3


@pytest.mark.parametrize("method", ["test.lose_database", "test.lose_connection"])
async def test_database_failure_is_service_unavailable_without_internals(
    failing_client: TestClient[Any, Any], world: World, method: str
) -> None:
    reply = await send(failing_client, request_object(method, id=5))
    assert reply.status == 200
    assert_no_internals(reply.text)
    body = reply.json
    assert body["id"] == 5
    assert body["error"]["code"] == SERVICE_UNAVAILABLE
    assert SECRET not in str(body["error"].get("data"))


async def test_failing_item_does_not_spoil_its_batch(
    failing_client: TestClient[Any, Any], world: World
) -> None:
    batch = [
        request_object("test.explode", id=1),
        request_object("course.list", id=2),
        request_object("test.lose_database", id=3),
        request_object("purchase.create", {"course": "python-basics"}, id=4),
    ]
    reply = await send(failing_client, batch, token=world.alice.token)
    assert reply.status == 200
    assert_no_internals(reply.text)
    answers = {answer["id"]: answer for answer in reply.json}
    assert answers[1]["error"]["code"] == INTERNAL_ERROR
    assert len(answers[2]["result"]) == 2
    assert answers[3]["error"]["code"] == SERVICE_UNAVAILABLE
    assert answers[4]["result"]["state"] == "pending"


async def test_failing_notification_is_still_not_answered(
    failing_client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await failing_client.post(
            "/rpc", json={"jsonrpc": "2.0", "method": "test.explode"}
        )
    assert response.status == 204
    assert "internal error" in caplog.text


async def test_unreachable_database_is_service_unavailable(
    app_client: AppClientFactory, settings: Settings, tmp_path: Any
) -> None:
    # A database file in a directory that does not exist cannot be opened.
    missing = tmp_path / "no-such-directory" / "db.sqlite3"
    threads_before = set(threading.enumerate())
    client = await app_client(
        settings=dataclasses.replace(settings, database_url=f"sqlite+aiosqlite:///{missing}")
    )
    for method, token in (("course.list", None), ("purchase.list", "rpcs_some-token")):
        reply = await send(client, request_object(method), token=token)
        assert reply.status == 200
        assert_no_internals(reply.text)
        assert "unable to open" not in reply.text
        assert reply.json["error"]["code"] == SERVICE_UNAVAILABLE, method
    await _threads_finished(set(threading.enumerate()) - threads_before)


async def _threads_finished(threads: set[threading.Thread]) -> None:
    """Wait for aiosqlite's worker threads of the failed connections to stop.

    aiosqlite stops the worker of a connection that failed to open without awaiting it;
    the worker then reports to the event loop, which must still be running.
    """
    for _ in range(200):
        if not any(thread.is_alive() for thread in threads):
            return
        await asyncio.sleep(0.01)


async def test_custom_registry_serves_a_working_method(
    app_client: AppClientFactory,
) -> None:
    # The failures above come from the failing handlers, not from the custom registry.
    async def ping(ctx: RpcContext, actor: Actor | None) -> dict[str, str]:
        """Answer pong."""
        return {}

    registry = MethodRegistry([RpcMethod("test.ping", ping, NoParams, Out(), auth=False)])
    client = await app_client(registry=registry)
    body = (await send(client, request_object("test.ping"))).json
    assert body == {"jsonrpc": "2.0", "result": {}, "id": 1}
