"""Alembic environment: runs migrations on the connection ``rpc_server.db.migrate`` hands in.

``rpc-server migrate`` is the way to run migrations; this file also works under the
``alembic`` command when ``sqlalchemy.url`` is set in the config.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from models import Base
from rpc_server.db.migrate import check_sqlite_foreign_keys
from rpc_server.db.stock_engine import stock_engine

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables by copying them; batch mode makes that automatic.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone(url: str) -> None:
    # As rpc-server migrate does (rpc_server.db.migrate): SQLite's foreign keys off, checked.
    engine = stock_engine(url, foreign_keys=False, poolclass=NullPool)
    sqlite = engine.dialect.name == "sqlite"
    async with engine.connect() as connection:
        await connection.run_sync(run_on)
        if sqlite:
            await connection.run_sync(check_sqlite_foreign_keys)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported; use rpc-server migrate.")

shared = config.attributes.get("connection")
if shared is not None:
    run_on(shared)
else:
    asyncio.run(run_standalone(config.get_main_option("sqlalchemy.url") or ""))
