"""The statements behind registration.list pages and the pending-purchase cap read an
index made for them, on both engines (EXPLAIN of the very statements the repositories
run, on enough rows for the planner to choose).

- A page of registrations: ``(user_id, id)``, in order, never sorted (with or without a
  cursor), even with another user's newer registrations in the way.
- The count of a user's open purchases: the partial index of pending purchases, so a
  user's thousands of settled purchases are never read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from rpc_server.db.repositories import registration_page_query
from rpc_server.db.repositories.purchases import _PENDING_OF_OWNER
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World

NUMBERS = "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :count) "


async def add_purchases(
    engine: AsyncEngine, owner_id: int, course_id: int, count: int, state: str
) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                NUMBERS + "INSERT INTO purchases (purchase_id, owner_id, course_id, amount, "
                "currency, state, created_at, updated_at) "
                "SELECT :prefix || n, :owner, :course, 49.00, 'USD', :state, :now, :now FROM g"
            ),
            {"count": count, "prefix": f"{owner_id}-{state}-", "owner": owner_id,
             "course": course_id, "state": state, "now": datetime.now(UTC)},
        )  # fmt: skip


async def register_fulfilled(engine: AsyncEngine, owner_id: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO course_registrations (purchase_id, user_id, course_id, created_at) "
                "SELECT id, owner_id, course_id, created_at FROM purchases "
                "WHERE owner_id = :owner AND state = 'fulfilled' ORDER BY id"
            ),
            {"owner": owner_id},
        )


async def analyze(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("ANALYZE"))


async def plan(engine: AsyncEngine, statement: Executable, values: dict[str, Any]) -> str:
    """The engine's plan of ``statement`` (as the repositories compile it) as text: SQLite's
    EXPLAIN QUERY PLAN lines, or PostgreSQL's EXPLAIN (FORMAT JSON)."""
    compiled = statement.compile(dialect=engine.dialect)
    bound = compiled.construct_params(values)  # with the statement's own (OFFSET 0)
    arguments = [bound[name] for name in compiled.positiontup or []]
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        if engine.dialect.name == "sqlite":
            cursor = await driver.execute("EXPLAIN QUERY PLAN " + str(compiled), arguments)
            return "\n".join(str(row[3]) for row in await cursor.fetchall())
        document = await driver.fetchval("EXPLAIN (FORMAT JSON) " + str(compiled), *arguments)
        return json.dumps(json.loads(document) if isinstance(document, str) else document)


async def test_a_page_of_registrations_reads_the_user_id_id_index_in_order(
    engine: AsyncEngine, uow_factory: SqlUnitOfWorkFactory, world: World
) -> None:
    alice, bob = world.alice.actor.user_id, world.bob.actor.user_id
    await add_purchases(engine, alice, world.python.pk, 300, "fulfilled")
    await add_purchases(engine, bob, world.python.pk, 30_000, "fulfilled")  # all newer
    await register_fulfilled(engine, alice)
    await register_fulfilled(engine, bob)
    await analyze(engine)

    page = await services.list_registrations(uow_factory, world.alice.actor, limit=20)
    assert len(page.items) == 20 and page.next_before is not None
    # The first page must come from (user_id, id): walking the primary key backwards
    # would read past all of bob's newer registrations. Below a cursor among alice's
    # own, the primary key's short range below it is as good.
    for before, indexes in (
        (None, {"ix_course_registrations_user_id_id"}),
        (page.next_before, {"ix_course_registrations_user_id_id", "pk_course_registrations"}),
    ):
        statement = registration_page_query(before=before is not None)
        values = {"user_id": alice, "limit": 21, "before": before}
        described = await plan(engine, statement, values)
        if engine.dialect.name == "sqlite":
            [scan] = [line for line in described.splitlines() if "course_registrations" in line]
            assert any(f"INDEX {index} " in scan for index in indexes), described
            assert "TEMP B-TREE" not in described, described  # no sort
        else:
            nodes = plan_nodes(json.loads(described)[0]["Plan"])
            [scan] = [n for n in nodes if n.get("Relation Name") == "course_registrations"]
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), described
            assert scan["Index Name"] in indexes, (before, described)
            assert not any(n["Node Type"] == "Sort" for n in nodes), described


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [node]
    for child in node.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


async def test_counting_open_purchases_reads_only_the_pending_index(
    engine: AsyncEngine, world: World
) -> None:
    alice = world.alice.actor.user_id
    await add_purchases(engine, alice, world.python.pk, 5000, "fulfilled")
    await add_purchases(engine, alice, world.python.pk, 3, "pending")
    await analyze(engine)

    described = await plan(engine, _PENDING_OF_OWNER, {"owner_id": alice})
    # (owner_id, state, id), or (state, id) when the planner knows open purchases are few
    assert "ix_purchases_owner_id_state_id" in described or "ix_purchases_state_id" in described
    assert "ix_purchases_owner_id_id" not in described, described
