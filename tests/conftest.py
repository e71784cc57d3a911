"""Shared fixtures: a migrated SQLite file per test, the app over real HTTP, demo actors.

Every test gets its own database file (copied from one migrated template per session),
its own settings and its own app, so tests never share state.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.database import create_engine
from rpc_server.domain import services
from rpc_server.domain.records import Actor, Course
from rpc_server.migrate import migrate
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory

FRONTEND_URL = "https://shop.example"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated to head with Alembic; tests get copies of it."""
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    asyncio.run(migrate(sqlite_url(path)))
    return path


@pytest.fixture
def database_url(tmp_path: Path, migrated_template: Path) -> str:
    path = tmp_path / "test.sqlite3"
    shutil.copy(migrated_template, path)
    return sqlite_url(path)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url, frontend_url=FRONTEND_URL, mail_dir=str(tmp_path / "mail")
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def uow_factory(engine: AsyncEngine) -> SqlAlchemyUnitOfWorkFactory:
    return SqlAlchemyUnitOfWorkFactory(engine)


@dataclass(frozen=True)
class User:
    email: str
    token: str
    actor: Actor


@dataclass(frozen=True)
class World:
    """What every HTTP test starts with: three users and two courses."""

    alice: User
    bob: User
    staff: User
    python: Course
    sql: Course


@pytest.fixture
async def world(uow_factory: SqlAlchemyUnitOfWorkFactory) -> World:
    users = []
    for email, is_staff in (
        ("alice@example.com", False),
        ("bob@example.com", False),
        ("support@example.com", True),
    ):
        token = await services.issue_token(uow_factory, email, is_staff=is_staff)
        actor = await services.authenticate(uow_factory, token)
        assert actor is not None
        users.append(User(email, token, actor))
    python = await services.save_course(
        uow_factory, slug="python-basics", title="Python Basics",
        price=Decimal("49.00"), currency="USD",
    )  # fmt: skip
    sql = await services.save_course(
        uow_factory, slug="sql-fundamentals", title="SQL Fundamentals",
        price=Decimal("39.50"), currency="EUR",
    )  # fmt: skip
    return World(*users, python=python, sql=sql)


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings))


RpcCall = Callable[..., Awaitable[Any]]


@pytest.fixture
def rpc(client: TestClient[Any, Any]) -> RpcCall:
    """``await rpc(method, params, token=...)``: one call over HTTP; returns the parsed body."""
    counter = iter(range(1, 1_000_000))

    async def call(method: str, params: Any = None, *, token: str | None = None) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(counter)}
        if params is not None:
            request["params"] = params
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await client.post("/rpc", json=request, headers=headers)
        assert response.status == 200, await response.text()
        return await response.json()

    return call
