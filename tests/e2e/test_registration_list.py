"""registration.list over HTTP: the bare array of a call without params, and pages.

Without params it answers the array it always did (now at most the newest 100); with
``limit`` or ``cursor`` a page ``{items, next_cursor}`` as ``purchase.list`` does.
"""

from __future__ import annotations

from typing import Any

import pytest

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import RpcCall, World
from tests.integration.paying import pay_and_fulfil

INVALID_PARAMS = -32602


async def registered(uow_factory: SqlUnitOfWorkFactory, world: World, count: int) -> list[str]:
    """Register alice for ``count`` new courses (bought and paid); return the purchase
    ids, oldest first. Bob gets one registration too, never listed for alice."""
    purchase_ids = []
    for n in range(count):
        slug = f"course-{n}"
        await services.save_course(
            uow_factory, slug=slug, title=f"Course {n}", price=10, currency="USD"
        )
        purchase = await services.create_purchase(uow_factory, world.alice.actor, course=slug)
        await pay_and_fulfil(uow_factory, world.alice.actor, purchase)
        purchase_ids.append(purchase.purchase_id)
    bobs = await services.create_purchase(uow_factory, world.bob.actor, course="python-basics")
    await pay_and_fulfil(uow_factory, world.bob.actor, bobs)
    return purchase_ids


def result_of(answer: dict[str, Any]) -> Any:
    assert "error" not in answer, answer
    return answer["result"]


async def walk(rpc: RpcCall, token: str, limit: int) -> tuple[list[str], list[int]]:
    """Every page with ``limit``: the purchase ids seen, and each page's size."""
    seen: list[str] = []
    sizes: list[int] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = result_of(await rpc("registration.list", params, token=token))
        assert set(page) == {"items", "next_cursor"}
        sizes.append(len(page["items"]))
        seen += [item["purchase_id"] for item in page["items"]]
        if page["next_cursor"] is None:
            return seen, sizes
        params = {"limit": limit, "cursor": page["next_cursor"]}


async def test_pages_walk_every_registration_once_newest_first(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    purchase_ids = await registered(uow_factory, world, 7)
    seen, sizes = await walk(rpc, world.alice.token, limit=3)
    assert sizes == [3, 3, 1]
    assert seen == purchase_ids[::-1]
    assert (await walk(rpc, world.alice.token, limit=7))[1] == [7]  # exact: no next page


@pytest.mark.parametrize("params", [None, {}, []], ids=["absent", "empty-object", "empty-array"])
async def test_without_params_the_answer_is_the_bare_array_it_always_was(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory, params: Any
) -> None:
    purchase_ids = await registered(uow_factory, world, 3)
    answer = result_of(await rpc("registration.list", params, token=world.alice.token))
    assert isinstance(answer, list)
    assert [r["purchase_id"] for r in answer] == purchase_ids[::-1]
    assert set(answer[0]) == {"course", "purchase_id", "created_at"}
    assert [r["course"] for r in answer] == ["course-2", "course-1", "course-0"]


async def test_the_bare_array_is_bounded_to_the_newest_hundred(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    purchase_ids = await registered(uow_factory, world, 101)
    answer = result_of(await rpc("registration.list", token=world.alice.token))
    assert [r["purchase_id"] for r in answer] == purchase_ids[::-1][:100]
    # The oldest one is still reachable, through the pages.
    assert (await walk(rpc, world.alice.token, limit=100))[0] == purchase_ids[::-1]


async def test_a_cursor_alone_continues_with_the_default_page_size(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    purchase_ids = await registered(uow_factory, world, 23)
    first = result_of(await rpc("registration.list", {"limit": 1}, token=world.alice.token))
    rest = result_of(
        await rpc("registration.list", {"cursor": first["next_cursor"]}, token=world.alice.token)
    )
    assert [r["purchase_id"] for r in rest["items"]] == purchase_ids[::-1][1:21]
    assert rest["next_cursor"] is not None


async def test_params_by_position_are_limit_then_cursor(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    purchase_ids = await registered(uow_factory, world, 3)
    first = result_of(await rpc("registration.list", [2], token=world.alice.token))
    second = result_of(
        await rpc("registration.list", [2, first["next_cursor"]], token=world.alice.token)
    )
    ids = [r["purchase_id"] for r in first["items"] + second["items"]]
    assert ids == purchase_ids[::-1]
    assert second["next_cursor"] is None


async def test_no_registrations_is_an_empty_array_or_an_empty_page(
    rpc: RpcCall, world: World
) -> None:
    token = world.alice.token
    assert result_of(await rpc("registration.list", token=token)) == []
    page = result_of(await rpc("registration.list", {"limit": 5}, token=token))
    assert page == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"limit": 2.5}, "limit"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": 12}, "cursor"),
        ({"since": 1}, "since"),
    ],
)
async def test_bad_params_are_invalid_params_naming_the_field(
    rpc: RpcCall, world: World, params: dict[str, Any], field: str
) -> None:
    answer = await rpc("registration.list", params, token=world.alice.token)
    assert answer["error"]["code"] == INVALID_PARAMS
    assert field in answer["error"]["data"]


async def test_a_cursor_shows_nothing_of_another_users_registrations(
    rpc: RpcCall, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    await registered(uow_factory, world, 3)
    alices = result_of(await rpc("registration.list", {"limit": 1}, token=world.alice.token))
    bobs = result_of(
        await rpc("registration.list", {"cursor": alices["next_cursor"]}, token=world.bob.token)
    )
    # Below alice's newest registration there are only alice's and none of bob's (his
    # is newer): bob sees nothing.
    assert bobs == {"items": [], "next_cursor": None}
