"""A batch's own deadline (RPC_SERVER_BATCH_TIMEOUT): the calls still running then, and
those still waiting for a lane, answer -32001 with {"batch_timeout_seconds": N} and roll
back; the calls already answered keep their answers; a single call keeps its own timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rpc_server.config import Settings
from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from schemas.base import Out
from tests.conftest import World
from tests.e2e.conftest import (
    TIMED_OUT,
    AppClientFactory,
    Counts,
    assert_error,
    notification_object,
    request_object,
    send,
)
from tests.e2e.test_envelope_limits import SLOW_REGISTRY, NoParams
from tests.e2e.test_metrics import scrape_of

BATCH_TIMEOUT = 0.5
CALL_TIMEOUT = 5.0  # test.slow sleeps 5 s: only the batch's deadline can cut it in time
LANES = 4


@pytest.fixture
async def deadline_client(app_client: AppClientFactory, settings: Settings) -> TestClient[Any, Any]:
    return await app_client(
        settings=dataclasses.replace(
            settings,
            call_timeout=CALL_TIMEOUT,
            batch_timeout=BATCH_TIMEOUT,
            db_pool_size=LANES,  # a batch's items run in as many lanes
        ),
        registry=SLOW_REGISTRY,
    )


def assert_cut_by_the_batch(answer: Any, id: Any) -> None:
    error = assert_error(answer, TIMED_OUT, id)
    assert error["message"] == "Timed out"
    assert error["data"] == {"batch_timeout_seconds": BATCH_TIMEOUT}


async def test_a_batch_is_answered_by_its_deadline_with_the_slow_calls_timed_out(
    deadline_client: TestClient[Any, Any], world: World, row_counts: Counts
) -> None:
    before = await row_counts()
    batch = [
        request_object("test.quick", id="quick"),
        request_object("course.list", id="courses"),
        request_object("test.slow_write", id="write"),
        notification_object("test.slow"),
        # More slow calls than lanes: some are still waiting for a lane at the deadline.
        *(request_object("test.slow", id=n) for n in range(2 * LANES)),
    ]
    started = time.monotonic()
    reply = await send(deadline_client, batch, token=world.alice.token)
    elapsed = time.monotonic() - started
    assert reply.status == 200
    answers = {answer["id"]: answer for answer in reply.json}
    assert len(reply.json) == len(batch) - 1  # the notification is not answered
    assert answers["quick"] == {"jsonrpc": "2.0", "result": {}, "id": "quick"}
    assert len(answers["courses"]["result"]) == 2
    for id in ("write", *range(2 * LANES)):
        assert_cut_by_the_batch(answers[id], id)
    # Without the deadline: waves of 5-second calls, four at a time.
    assert BATCH_TIMEOUT <= elapsed < BATCH_TIMEOUT + 2.0, elapsed
    # The write that was cut rolled back, and let go of the database.
    assert await row_counts() == before
    create = request_object("purchase.create", {"course": "python-basics"}, id="after")
    created = await send(deadline_client, create, token=world.alice.token)
    assert created.json["result"]["state"] == "pending"


async def test_a_single_call_keeps_its_own_timeout(
    app_client: AppClientFactory, settings: Settings
) -> None:
    client = await app_client(
        settings=dataclasses.replace(settings, call_timeout=1.0, batch_timeout=BATCH_TIMEOUT),
        registry=SLOW_REGISTRY,
    )
    started = time.monotonic()
    reply = await send(client, request_object("test.slow", id=1))
    assert time.monotonic() - started >= 1.0
    error = assert_error(reply.json, TIMED_OUT, 1)
    assert error["data"] == {"timeout_seconds": 1.0}


# --- one lane's calls, each with its own timeout ------------------------------------------

CALL_TIMEOUT_IN_LANE = 0.3
NAP = 0.12  # well within the call timeout; three of them are not


async def nap(ctx: RpcContext, actor: Actor | None) -> Any:
    """Takes NAP seconds."""
    await asyncio.sleep(NAP)
    return {}


NAP_REGISTRY = MethodRegistry(
    [*SLOW_REGISTRY.methods.values(), RpcMethod("test.nap", nap, NoParams, Out(), auth=False)]
)


async def test_each_call_of_a_lane_gets_its_own_timeout_and_the_lane_goes_on_after_a_cut(
    app_client: AppClientFactory, settings: Settings
) -> None:
    # One lane: the items run one after another, and its calls share one timer
    # (rpc_server.jsonrpc.envelope.answer), which must still give each call its own
    # timeout: three naps in a row outlast one timeout, and none of them is cut.
    client = await app_client(
        settings=dataclasses.replace(settings, call_timeout=CALL_TIMEOUT_IN_LANE, db_pool_size=1),
        registry=NAP_REGISTRY,
    )
    batch = [
        request_object("test.nap", id="nap-1"),
        request_object("test.nap", id="nap-2"),
        request_object("test.nap", id="nap-3"),
        request_object("test.slow", id="slow-1"),
        request_object("test.quick", id="quick"),
        notification_object("test.slow"),
        request_object("test.slow", id="slow-2"),
        request_object("test.nap", id="nap-4"),
    ]
    started = time.monotonic()
    reply = await send(client, batch)
    elapsed = time.monotonic() - started
    answers = {answer["id"]: answer for answer in reply.json}
    assert list(answers) == ["nap-1", "nap-2", "nap-3", "slow-1", "quick", "slow-2", "nap-4"]
    for id in ("nap-1", "nap-2", "nap-3", "quick", "nap-4"):
        assert answers[id] == {"jsonrpc": "2.0", "result": {}, "id": id}
    for id in ("slow-1", "slow-2"):
        error = assert_error(answers[id], TIMED_OUT, id)
        assert error["data"] == {"timeout_seconds": CALL_TIMEOUT_IN_LANE}
    # Four naps and three cuts, one after another: each cut at its own timeout (up to
    # 1 % later), not at the first call's, nor after the 5 s a slow call takes.
    assert 4 * NAP + 3 * CALL_TIMEOUT_IN_LANE <= elapsed < 4 * NAP + 3 * CALL_TIMEOUT_IN_LANE + 1.5
    # The cut calls are counted as -32001, the notification's too, each once.
    calls = (await scrape_of(client)).calls()
    assert {key: n for key, n in calls.items() if key[0] == "test.slow"} == {
        ("test.slow", str(TIMED_OUT)): 3
    }
