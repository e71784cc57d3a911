"""``GET /readyz`` tells the truth: ready only when the database answers and its schema is
at the latest migration.

Over HTTP, on each engine: a database without a schema or a migration behind is 503 with
the reason, and ready as soon as it is migrated (a negative answer is never kept); a
positive answer is kept for the process (a probe then costs a ``SELECT 1``), and after a
failed probe the schema is read again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url

from rpc_server.config import Settings
from rpc_server.db.migrate import migrate
from tests.e2e.conftest import AppClientFactory
from tests.tcp_proxy import TcpProxy
from tests.unmigrated import LATEST_REVISION, OLDER_REVISION, set_revision, unmigrated_database

READY = {"status": "ready"}
SCHEMA_BEHIND = {"status": "unavailable", "reason": "schema not at the latest migration"}
UNAVAILABLE = {"status": "unavailable"}


@pytest.fixture
def unmigrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with unmigrated_database(backend, tmp_path) as url:
        yield url


async def readyz(client: TestClient[Any, Any]) -> tuple[int, Any]:
    response = await client.get("/readyz")
    return response.status, await response.json()


@pytest.mark.parametrize("state", ["unmigrated", "outdated"])
async def test_readyz_is_503_until_the_schema_is_at_the_latest_migration(
    state: str, unmigrated_url: str, app_client: AppClientFactory, settings: Settings
) -> None:
    if state == "outdated":
        await migrate(unmigrated_url, OLDER_REVISION)
    client = await app_client(
        settings=dataclasses.replace(settings, database_url=unmigrated_url, mail_in_serve=False)
    )
    assert await readyz(client) == (503, SCHEMA_BEHIND)
    assert await readyz(client) == (503, SCHEMA_BEHIND)  # still: nothing changed

    await migrate(unmigrated_url)  # what the operator is told to do
    assert await readyz(client) == (200, READY)


async def test_readyz_keeps_its_positive_answer_for_the_process(
    database_url: str, client: TestClient[Any, Any]
) -> None:
    assert await readyz(client) == (200, READY)
    # The schema is not read again while the database answers: a probe is one SELECT 1.
    await set_revision(database_url, OLDER_REVISION)
    assert await readyz(client) == (200, READY)


@pytest.mark.backends("postgresql")
async def test_after_a_failed_probe_readyz_reads_the_schema_again(
    database_url: str, database_proxy: TcpProxy, app_client: AppClientFactory, settings: Settings
) -> None:
    proxied_url = make_url(database_url).set(port=database_proxy.port)
    proxied = proxied_url.render_as_string(hide_password=False)
    client = await app_client(
        settings=dataclasses.replace(
            settings, database_url=proxied, db_connect_timeout=1.0, mail_in_serve=False
        )
    )
    assert await readyz(client) == (200, READY)

    # The database goes away, and comes back restored from an older backup.
    await database_proxy.stop()
    assert await readyz(client) == (503, UNAVAILABLE)
    await set_revision(database_url, OLDER_REVISION)  # directly, not through the database_proxy
    await database_proxy.start()
    assert await readyz(client) == (503, SCHEMA_BEHIND)

    await set_revision(database_url, LATEST_REVISION)
    assert await readyz(client) == (200, READY)
