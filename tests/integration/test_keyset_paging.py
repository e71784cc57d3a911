"""purchase.list pages with keyset cursors: one indexed query per page, however deep."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World

PURCHASES = 100_000


async def insert_purchases(engine: AsyncEngine, owner_id: int, course_id: int, n: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, currency, "
                "state, created_at, updated_at) "
                "SELECT md5(:prefix || g), :owner, :course, 49.00, 'USD', "
                "CASE WHEN g % 3 = 0 THEN 'fulfilled' ELSE 'pending' END, now(), now() "
                "FROM generate_series(1, :n) AS g"
            ),
            {"prefix": f"{owner_id}-", "owner": owner_id, "course": course_id, "n": n},
        )
        await connection.execute(text("ANALYZE purchases"))


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


@pytest.mark.backends("postgresql")
async def test_paging_a_hundred_thousand_purchases(
    engine: AsyncEngine, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    await insert_purchases(engine, world.alice.actor.user_id, world.python.pk, PURCHASES)
    await insert_purchases(engine, world.bob.actor.user_id, world.python.pk, 20_000)

    seen: set[str] = set()
    cursor: int | None = None
    pages = 0
    while True:
        page = await services.list_purchases(
            uow_factory, world.alice.actor, limit=100, cursor=cursor
        )
        keys = [p.pk for p in page.items]
        assert keys == sorted(keys, reverse=True)  # newest first
        seen.update(p.purchase_id for p in page.items)
        pages += 1
        if page.next_before is None:
            break
        cursor = page.next_before
    assert len(seen) == PURCHASES
    assert pages == PURCHASES // 100

    # The first page and a page deep in the list: each is one query, read in order from
    # an index, never sorted or scanned whole. For the first page that index must be
    # (owner_id, id): bob's 20,000 purchases are newer than all of alice's, and a plan
    # walking the primary key would read past every one of them. Below a cursor near the
    # start, the primary key's short range below the cursor is as good.
    for cursor, indexes in (
        (None, {"ix_purchases_owner_id_id"}),
        (500, {"ix_purchases_owner_id_id", "pk_purchases"}),
    ):
        nodes = await plan_of_page(engine, uow_factory, world, cursor)
        on_purchases = [n for n in nodes if n.get("Relation Name") == "purchases"]
        assert [n["Node Type"] for n in on_purchases] == ["Index Scan"], nodes
        assert on_purchases[0]["Index Name"] in indexes, (cursor, nodes)
        assert on_purchases[0]["Scan Direction"] == "Backward"
        assert not any(n["Node Type"] == "Sort" for n in nodes), (cursor, nodes)


async def plan_of_page(
    engine: AsyncEngine, uow_factory: SqlUnitOfWorkFactory, world: World, cursor: int | None
) -> list[dict[str, Any]]:
    """The plan nodes of the one statement that reads alice's page before ``cursor``."""
    statements: list[tuple[str, tuple[Any, ...]]] = []
    fetch = asyncpg.Connection.fetch

    async def record(self: asyncpg.Connection, statement: str, *args: Any) -> Any:
        if "FROM purchases" in statement:
            statements.append((statement, args))
        return await fetch(self, statement, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncpg.Connection, "fetch", record)
        await services.list_purchases(uow_factory, world.alice.actor, limit=20, cursor=cursor)
    assert len(statements) == 1
    statement, parameters = statements[0]
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        raw = await driver.fetchval("EXPLAIN (FORMAT JSON) " + statement, *parameters)
    return plan_nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"])
