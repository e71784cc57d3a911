"""Shared fixtures: a fresh migrated database per test, the app over real HTTP, demo actors.

Every test that uses a database runs on SQLite and, when ``RPC_SERVER_TEST_DATABASE_URL``
names a PostgreSQL server, on PostgreSQL too (test ids end in ``[sqlite]`` or
``[postgresql]``). ``@pytest.mark.backends("postgresql")`` limits a test to the engines
it is about. Each test gets its own database, settings and app: nothing is shared.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import create_app
from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.db.engines import open_engine
from rpc_server.db.migrate import migrate
from rpc_server.db.stock_engine import stock_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.records import Actor, Course
from rpc_server.domain.states import Scope
from tests import databases
from tests.payments import TEST_PAYMENT_KEY
from tests.tcp_proxy import TcpProxy

FRONTEND_URL = "https://shop.example"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated to head with Alembic; tests get copies of it."""
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    asyncio.run(migrate(sqlite_url(path)))
    return path


POSTGRES_ADMIN_URL = databases.postgres_admin_url()
AVAILABLE_BACKENDS = ("sqlite", "postgresql") if POSTGRES_ADMIN_URL else ("sqlite",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every database test once per available engine (limited by ``backends``)."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None:
        metafunc.parametrize("backend", AVAILABLE_BACKENDS, indirect=True)
        return
    # A test limited to an engine this run lacks is reported as skipped, saying why,
    # rather than as pytest's "got empty parameter set".
    unknown = set(marker.args) - {"sqlite", "postgresql"}
    if unknown:
        raise ValueError(f"backends(): unknown engine(s) {sorted(unknown)}")
    metafunc.parametrize(
        "backend",
        [
            name
            if name in AVAILABLE_BACKENDS
            else pytest.param(name, marks=pytest.mark.skip(reason=NO_POSTGRESQL))
            for name in marker.args
        ],
        indirect=True,
    )


NO_POSTGRESQL = (
    f"needs PostgreSQL: set {databases.TEST_DATABASE_URL_VARIABLE} to a postgresql+asyncpg:// "
    "URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)"
)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """One migrated PostgreSQL template database per session."""
    assert POSTGRES_ADMIN_URL is not None
    name = asyncio.run(databases.create_template(POSTGRES_ADMIN_URL))
    yield name
    asyncio.run(databases.drop(POSTGRES_ADMIN_URL, name))


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if backend == "sqlite":
        path = tmp_path / "test.sqlite3"
        shutil.copy(request.getfixturevalue("migrated_template"), path)
        yield sqlite_url(path)
        return
    assert POSTGRES_ADMIN_URL is not None
    template = request.getfixturevalue("postgres_template")
    url = asyncio.run(databases.create_from_template(POSTGRES_ADMIN_URL, template))
    yield url
    asyncio.run(databases.drop(POSTGRES_ADMIN_URL, make_url(url).database or ""))


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        frontend_url=FRONTEND_URL,
        mail_dir=str(tmp_path / "mail"),
        # Off here, so that tests sending thousands of calls test what they are about;
        # tests/e2e/test_rate_limit.py turns them on.
        rate_limit=0,
        anonymous_rate_limit=0,
        # Proofs signed with tests.payments.TEST_PAYMENT_KEY verify.
        payment_keys=(TEST_PAYMENT_KEY,),
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A stock SQLAlchemy engine: the tests' own view of the rows, independent of the
    server's database layer (``db_engine``)."""
    engine = stock_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db_engine(database_url: str) -> AsyncIterator[Engine]:
    """The server's database layer on the test's database (``rpc_server.db``)."""
    engine = open_engine(database_url)
    yield engine
    await engine.close()


@pytest.fixture
def uow_factory(db_engine: Engine) -> SqlUnitOfWorkFactory:
    return SqlUnitOfWorkFactory(db_engine)


@dataclass(frozen=True)
class User:
    email: str
    token: str
    actor: Actor


@dataclass(frozen=True)
class World:
    """What every HTTP test starts with: two buyers, a staff user (support desk), the
    shop's payment backend (a payments-scope token: fulfils without a proof) and two
    courses."""

    alice: User
    bob: User
    staff: User
    payments: User
    python: Course
    sql: Course


@pytest.fixture
async def world(uow_factory: SqlUnitOfWorkFactory) -> World:
    users = []
    for email, scope in (
        ("alice@example.com", Scope.BUYER),
        ("bob@example.com", Scope.BUYER),
        ("support@example.com", Scope.STAFF),
        ("payments@example.com", Scope.PAYMENTS),
    ):
        token = await services.issue_token(uow_factory, email, scope=scope)
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


@pytest.fixture
async def database_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test's database server: a test connects through it
    (its port) and stops it to take the database away, starts it to bring it back."""
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()
