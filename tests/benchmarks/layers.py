"""Where a ``purchase.get`` spends its CPU, layer by layer, in one process.

    .venv/bin/python -m tests.benchmarks.layers [--engine sqlite|postgresql|both] [--calls N]

No HTTP and no concurrency: each step is run ``--calls`` times in a row, five times over,
and the least CPU time per call (user + system, every thread of the process: aiosqlite's
included) is printed. The least is the run the machine disturbed least; the steps are
measured the same way, so their differences are what each layer adds:

- the statement by hand on the driver (what the same-work baseline does per statement),
- a read unit of work: the pool, the statement compiled by SQLAlchemy (once) and run on
  the driver's connection,
- for reference, SQLAlchemy's own execution: the same statement through
  ``AsyncConnection.execute`` (connection out and back included), which units of work
  no longer use,
- the repository and service (``services.get_purchase``),
- Marshmallow: loading the params and dumping the result,
- the envelope (``envelope.answer``: jsonrpcserver, the method wrapper, both schemas,
  the service; the caller's token found in the token cache, as in the server) for
  ``rpc.discover`` and for ``purchase.get``.

The database is made for the run (a file in a temporary directory; on PostgreSQL a new
database on ``--postgres-url``, dropped at the end) with one user and one purchase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
from sqlalchemy import make_url

from rpc_server.db.engines import open_engine
from rpc_server.db.repositories import purchases
from rpc_server.db.stock_engine import stock_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.jsonrpc.batch_deadline import BatchDeadline
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.envelope import answer
from rpc_server.jsonrpc.json_codec import Fragment
from rpc_server.jsonrpc.token_cache import ActorCache
from rpc_server.methods import REGISTRY
from rpc_server.payment_signatures import PaymentSignatures
from tests.benchmarks.seed import create_database, drop_database

DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REPEATS = 5
BATCH = 50  # items of the batch measured


async def cpu_per_call(step: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Least CPU µs per call over ``REPEATS`` runs of ``calls`` calls (after a warm-up)."""
    for _ in range(min(calls, 200)):
        await step()
    best = float("inf")
    for _ in range(REPEATS):
        started = time.process_time()
        for _ in range(calls):
            await step()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


async def measure(engine_name: str, url: str, calls: int) -> list[tuple[str, float]]:
    engine = stock_engine(url)  # SQLAlchemy's own execution, for reference
    db_engine = open_engine(url)
    uow_factory = SqlUnitOfWorkFactory(db_engine)
    try:
        await services.save_course(
            uow_factory, slug="c", title="Course", price=Decimal("9.50"),
            currency="EUR",
        )  # fmt: skip
        token = await services.issue_token(uow_factory, "layers@example.com")
        actor = await services.authenticate(uow_factory, token)
        assert actor is not None
        purchase = await services.create_purchase(uow_factory, actor, course="c")
        statement = purchases._OWN_PURCHASE_BY_ID
        params = {"purchase_id": purchase.purchase_id, "owner_id": actor.user_id}
        compiled = statement.compile(dialect=engine.dialect)
        sql = str(compiled)
        positional = [params[name] for name in compiled.positiontup or ()]
        get = REGISTRY.methods["purchase.get"]
        links = FrontendLinks("http://localhost:3000")
        document = Fragment(b"{}")

        actors = ActorCache(ttl_seconds=300)  # as in the server: the token is looked up once

        payments = PaymentSignatures(())  # no key: nothing here verifies a payment

        def context() -> RpcContext:
            return RpcContext(uow=uow_factory, links=links, payments=payments, token=token,
                              service_description=document, actors=actors)  # fmt: skip

        request = {"jsonrpc": "2.0", "method": "purchase.get", "params": [purchase.purchase_id],
                   "id": 1}  # fmt: skip
        discover = {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}
        results: list[tuple[str, float]] = []

        if engine_name == "sqlite":
            raw = await aiosqlite.connect(make_url(url).database or "")
            by_hand: Callable[[], Awaitable[Any]] = lambda: raw.execute_fetchall(sql, positional)  # noqa: E731
        else:
            raw = await asyncpg.connect(
                make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
            )
            by_hand = lambda: raw.fetchrow(sql, *positional)  # noqa: E731
        try:
            results.append(
                ("the statement by hand on the driver", await cpu_per_call(by_hand, calls))
            )
        finally:
            await raw.close()

        async def unit_of_work() -> None:
            async with uow_factory() as uow:
                (await uow.connection.execute(statement, params)).first()

        results.append(("a read unit of work (pool, statement on the driver)",
                        await cpu_per_call(unit_of_work, calls)))  # fmt: skip

        async def sqlalchemy_execution() -> None:
            async with engine.connect() as connection:
                (await connection.execute(statement, params)).first()

        results.append(("reference: SQLAlchemy's AsyncConnection.execute, out and back",
                        await cpu_per_call(sqlalchemy_execution, calls)))  # fmt: skip

        async def service() -> None:
            await services.get_purchase(uow_factory, actor, purchase_id=purchase.purchase_id)

        results.append(("services.get_purchase (repository, records)",
                        await cpu_per_call(service, calls)))  # fmt: skip

        async def load() -> None:
            get.load_params([purchase.purchase_id], {})

        async def dump() -> None:
            get.dump_result(purchase)

        results.append(("Marshmallow: load the params", await cpu_per_call(load, calls)))
        results.append(("Marshmallow: dump the purchase", await cpu_per_call(dump, calls)))

        async def envelope_discover() -> None:
            await answer(discover, REGISTRY, context(), max_batch_length=100)

        async def envelope_get() -> None:
            await answer(request, REGISTRY, context(), max_batch_length=100)

        results.append(
            ("envelope.answer: rpc.discover", await cpu_per_call(envelope_discover, calls))
        )
        results.append(("envelope.answer: purchase.get (all of the above)",
                        await cpu_per_call(envelope_get, calls)))  # fmt: skip

        # A batch as the server runs it: its own context (coalesced reads, a deadline),
        # each item another purchase.
        others = [await services.create_purchase(uow_factory, actor, course="c")
                  for _ in range(BATCH)]  # fmt: skip
        batch = [{**request, "params": [p.purchase_id], "id": n} for n, p in enumerate(others)]

        async def envelope_batch() -> None:
            ctx = context()
            ctx.uow, ctx.batch_deadline = uow_factory.for_batch(), BatchDeadline.from_now(30)
            await answer(batch, REGISTRY, ctx, max_batch_length=100)

        per_batch = await cpu_per_call(envelope_batch, max(1, calls // BATCH))
        results.append((f"envelope.answer: a batch of {BATCH} purchase.get, per item",
                        per_batch / BATCH))  # fmt: skip
        return results
    finally:
        await engine.dispose()
        await db_engine.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("RPC_SERVER_TEST_DATABASE_URL") or DEFAULT_POSTGRES,
    )
    args = parser.parse_args()
    engines = ("sqlite", "postgresql") if args.engine == "both" else (args.engine,)
    print(f"CPU µs per call, least of {REPEATS} runs of {args.calls} calls in a row")
    print("| step | " + " | ".join(engines) + " |")
    print("|---|" + "--:|" * len(engines))
    table: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for engine_name in engines:
            url = await create_database(engine_name, Path(workdir), args.postgres_url)
            try:
                for step, micros in await measure(engine_name, url, args.calls):
                    table.setdefault(step, []).append(f"{micros:,.0f}")
            finally:
                await drop_database(url, args.postgres_url)
    for step, cells in table.items():
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
