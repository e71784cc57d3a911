"""Every ``rpc-server`` command answers a mistake with one line on stderr, never a traceback.

Each command runs as an operator runs it (a process, ``RPC_SERVER_DATABASE_URL``), on
each engine where a database is involved: an unmigrated or outdated database, a SQLite
file that does not exist (and must not be created), a PostgreSQL database that does not
exist, an unreachable server (named, its password never), a port in use, a reader that
closes the pipe, and bad values for each flag. Each failure is checked for its exit
status, exactly one line on stderr saying what is really wrong, and nothing written.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.db.migrate import migrate
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.states import PurchaseState
from rpc_server.mail.deliverer import ReceiptDeliverer
from rpc_server.mail.mailer import PermanentMailError
from rpc_server.payment_signatures import PaymentSignatures
from tests import databases
from tests.conftest import FRONTEND_URL, POSTGRES_ADMIN_URL, World, sqlite_url
from tests.payments import TEST_PAYMENT_KEY
from tests.processes import RPC_SERVER, free_port, running_server
from tests.unmigrated import LATEST_REVISION, OLDER_REVISION, tables_of, unmigrated_database

SIGPIPE_STATUS = 141  # 128 + SIGPIPE, as the shell reports a process killed by it


def run(
    *args: str, env: dict[str, str], cwd: Path, **popen: Any
) -> subprocess.CompletedProcess[str]:
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [RPC_SERVER, *args],
        cwd=cwd,
        env={**os.environ, "RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY, **env},
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
        **popen,
    )


def one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """Check the failure's shape (status, one stderr line, no traceback); return the line."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The default database is a file in the working directory: make sure it is ours.
    monkeypatch.delenv("RPC_SERVER_DATABASE_URL", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def unmigrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database that exists but has no schema."""
    with unmigrated_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def outdated_url(unmigrated_url: str) -> str:
    """A database migrated to the previous release's schema, one migration behind."""
    asyncio.run(migrate(unmigrated_url, OLDER_REVISION))
    return unmigrated_url


# Every command that works on an existing database, with valid arguments.
DATABASE_COMMANDS = {
    "create-token": ("create-token", "carol@example.com"),
    "revoke-token": ("revoke-token", "rpcs_not_a_token"),
    "revoke-token --user": ("revoke-token", "--user", "carol@example.com"),
    "create-course": ("create-course", "go-101", "--title", "Go", "--price", "10.00",
                      "--currency", "EUR"),
    "sign-payment": ("sign-payment", "0" * 32),
    "send-mail": ("send-mail", "--once"),
    "mail-status": ("mail-status",),
    "mail-retry": ("mail-retry", "1"),
}  # fmt: skip


@pytest.mark.parametrize("command", DATABASE_COMMANDS.values(), ids=DATABASE_COMMANDS.keys())
async def test_a_command_on_an_unmigrated_database_says_run_migrate_and_changes_nothing(
    command: tuple[str, ...], unmigrated_url: str, workdir: Path
) -> None:
    result = await asyncio.to_thread(
        run, *command, env={"RPC_SERVER_DATABASE_URL": unmigrated_url}, cwd=workdir
    )
    line = one_error_line(result, 1)
    assert line == "error: the database has no schema yet: run rpc-server migrate"
    assert await tables_of(unmigrated_url) == set()


@pytest.mark.parametrize("command", DATABASE_COMMANDS.values(), ids=DATABASE_COMMANDS.keys())
async def test_a_command_on_a_database_a_migration_behind_says_run_migrate(
    command: tuple[str, ...], outdated_url: str, workdir: Path
) -> None:
    result = await asyncio.to_thread(
        run, *command, env={"RPC_SERVER_DATABASE_URL": outdated_url}, cwd=workdir
    )
    line = one_error_line(result, 1)
    assert line == (
        f"error: the database schema is at revision {OLDER_REVISION}, not at the latest "
        f"migration {LATEST_REVISION}: run rpc-server migrate"
    )


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("state", ["unmigrated", "outdated"])
def test_serve_refuses_a_postgresql_database_not_at_the_latest_migration(
    state: str, unmigrated_url: str, workdir: Path
) -> None:
    if state == "outdated":
        asyncio.run(migrate(unmigrated_url, OLDER_REVISION))
    port = free_port()
    result = run(
        "serve", "--port", str(port), env={"RPC_SERVER_DATABASE_URL": unmigrated_url},
        cwd=workdir,
    )  # fmt: skip
    line = one_error_line(result, 1)
    assert line.startswith("error: the database ")
    assert line.endswith(": run rpc-server migrate")
    assert result.stdout == ""  # no endpoint announced: it never listened
    # ... and it left the schema alone (PostgreSQL is migrated by `migrate` only).
    tables = asyncio.run(tables_of(unmigrated_url))
    assert ("purchase_events" in tables) is False


@pytest.mark.backends("postgresql")
def test_seed_demo_on_an_unmigrated_postgresql_database_says_run_migrate(
    unmigrated_url: str, workdir: Path
) -> None:
    result = run("seed-demo", env={"RPC_SERVER_DATABASE_URL": unmigrated_url}, cwd=workdir)
    assert one_error_line(result, 1).endswith("run rpc-server migrate")
    assert asyncio.run(tables_of(unmigrated_url)) == set()


@pytest.mark.backends("sqlite")
def test_serve_on_sqlite_still_migrates_an_unmigrated_file_itself(
    unmigrated_url: str, workdir: Path
) -> None:
    output: list[str] = []
    with running_server({"RPC_SERVER_DATABASE_URL": unmigrated_url}, cwd=workdir, output=output):
        pass  # it answered /healthz: it migrated, checked the schema and listened
    assert "JSON-RPC 2.0 endpoint" in output[0]
    assert "purchase_events" in asyncio.run(tables_of(unmigrated_url))


@pytest.mark.parametrize(
    "command",
    [*DATABASE_COMMANDS.values(), ("create-token", "carol@example.com", "--expires-in", "7")],
    ids=[*DATABASE_COMMANDS.keys(), "create-token --expires-in"],
)
def test_no_command_but_migrate_seed_demo_and_serve_creates_a_sqlite_file(
    command: tuple[str, ...], workdir: Path
) -> None:
    # The default URL, ./rpc_server.sqlite3, in a directory without it.
    result = run(*command, env={}, cwd=workdir)
    line = one_error_line(result, 1)
    database = workdir / "rpc_server.sqlite3"
    assert line == (
        f"error: no database at {database}: run rpc-server migrate first "
        "(or rpc-server seed-demo for the demo)"
    )
    assert list(workdir.iterdir()) == []


def test_migrate_creates_the_file_the_others_then_use(workdir: Path) -> None:
    assert run("migrate", env={}, cwd=workdir).returncode == 0
    status = run("mail-status", env={}, cwd=workdir)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "pending: 0  sent: 0  dead: 0"


def test_commands_that_migrate_sqlite_into_a_missing_directory_say_so(workdir: Path) -> None:
    missing = workdir / "no-such-dir" / "shop.sqlite3"
    env = {"RPC_SERVER_DATABASE_URL": sqlite_url(missing)}
    for command in (("migrate",), ("seed-demo",), ("serve", "--port", str(free_port()))):
        result = run(*command, env=env, cwd=workdir)
        line = one_error_line(result, 1)
        assert line == (
            f"error: cannot create the SQLite database {missing}: "
            f"directory {missing.parent} does not exist"
        )
    assert list(workdir.iterdir()) == []


@pytest.mark.backends("postgresql")
def test_migrate_on_a_postgresql_database_that_does_not_exist_says_so(
    backend: str, workdir: Path
) -> None:
    assert POSTGRES_ADMIN_URL is not None
    url = make_url(POSTGRES_ADMIN_URL)
    missing = databases.with_database(POSTGRES_ADMIN_URL, "rpc_no_such_database")
    for command in (("migrate",), ("mail-status",)):
        result = run(*command, env={"RPC_SERVER_DATABASE_URL": missing}, cwd=workdir)
        line = one_error_line(result, 1)
        assert line == (
            f'error: the PostgreSQL database "rpc_no_such_database" does not exist at '
            f"{url.host}:{url.port}: create it (createdb rpc_no_such_database), then run "
            "rpc-server migrate"
        )


def closed_port() -> int:
    """A port nothing listens on (bound, never listened, closed)."""
    return free_port()


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.1", "Connect call failed"), ("db.invalid", "Name or service not known")],
    ids=["refused", "unknown-host"],
)
@pytest.mark.parametrize("command", ["migrate", "mail-status", "serve"])
def test_an_unreachable_postgresql_server_is_named_and_its_password_never_shown(
    host: str, reason: str, command: str, workdir: Path
) -> None:
    port = closed_port()
    url = f"postgresql+asyncpg://shop:s3cret-Pa55@{host}:{port}/shop"
    args = (command, "--port", str(free_port())) if command == "serve" else (command,)
    result = run(*args, env={"RPC_SERVER_DATABASE_URL": url}, cwd=workdir)
    line = one_error_line(result, 1)
    assert line.startswith(f'error: cannot reach the PostgreSQL database "shop" at {host}:{port}: ')
    assert reason in line
    assert "s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "postgres://shop:s3cret-Pa55@db/shop",
        "postgresql://shop:s3cret-Pa55@db/shop",
        "mysql://shop:s3cret-Pa55@db/shop",
        "sqlite:///shop.sqlite3",
    ],
)
def test_a_database_url_that_is_not_one_is_one_line_without_the_password(
    url: str, workdir: Path
) -> None:
    result = run("mail-status", env={"RPC_SERVER_DATABASE_URL": url}, cwd=workdir)
    line = one_error_line(result, 2)
    assert line.startswith("error: RPC_SERVER_DATABASE_URL is not a database URL: use ")
    assert "s3cret" not in result.stderr
    assert list(workdir.iterdir()) == []


def test_serve_on_a_port_in_use_is_one_line_and_creates_nothing(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            result = run("serve", "--port", str(port), "--workers", workers, env={}, cwd=workdir)
            line = one_error_line(result, 1)
            assert line == f"error: cannot listen on 127.0.0.1:{port}: address already in use"
            assert result.stdout == ""
    # Refused before migrating: serve on SQLite makes its file only when it will serve.
    assert list(workdir.iterdir()) == []


def test_serve_on_an_address_that_is_not_this_machines_is_one_line(workdir: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to an interface.
    result = run("serve", "--host", "192.0.2.1", "--port", "8080", env={}, cwd=workdir)
    line = one_error_line(result, 1)
    assert line == "error: cannot listen on 192.0.2.1:8080: cannot assign requested address"


async def test_mail_status_into_a_closed_pipe_exits_quietly(
    database_url: str, workdir: Path
) -> None:
    # `rpc-server mail-status | head -3`, with head gone before anything is written:
    # the pipe's read end is closed before the process starts, so every write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = await asyncio.to_thread(
            run, "mail-status", env={"RPC_SERVER_DATABASE_URL": database_url}, cwd=workdir,
            stdout=write_end,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == SIGPIPE_STATUS
    assert result.stderr == ""


def test_mail_status_piped_into_head_shows_its_first_lines(
    database_url: str, workdir: Path
) -> None:
    env = {**os.environ, "RPC_SERVER_DATABASE_URL": database_url}
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{RPC_SERVER} mail-status | head -1"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout == "pending: 0  sent: 0  dead: 0\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    "value", ["1e9", "1e400", "nan", "inf", "-inf", "0", "-1", "36501", "soon", ""]
)
async def test_create_token_refuses_an_expiry_that_is_not_days_or_never(
    value: str, database_url: str, workdir: Path, engine: AsyncEngine
) -> None:
    result = await asyncio.to_thread(
        run, "create-token", "carol@example.com", f"--expires-in={value}",
        env={"RPC_SERVER_DATABASE_URL": database_url}, cwd=workdir,
    )  # fmt: skip
    line = one_error_line(result, 2)
    assert line == (
        "rpc-server create-token: error: argument --expires-in: expected a number of days "
        f"between 0 and 36500, or never; got {value!r} (see rpc-server create-token --help)"
    )
    assert result.stdout == ""
    assert await count(engine, "users") == 0


@pytest.mark.parametrize("email", ["", "not an email", "a@x>, b@y", "carol@", "@example.com"])
async def test_create_token_refuses_what_is_not_an_email_address(
    email: str, database_url: str, workdir: Path, engine: AsyncEngine
) -> None:
    result = await asyncio.to_thread(
        run, "create-token", email, env={"RPC_SERVER_DATABASE_URL": database_url}, cwd=workdir
    )
    line = one_error_line(result, 2)
    assert line.startswith(
        f"rpc-server create-token: error: argument email: {email!r} is not an email address: "
    )
    assert result.stdout == ""
    assert await count(engine, "users") == 0


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        ("1e30", "Must be greater than or equal to 0 and less than or equal to 9999999999.99."),
        ("-1e30", "Must be greater than or equal to 0 and less than or equal to 9999999999.99."),
        ("1e999999", "Must be greater than or equal to 0 and less than or equal to 9999999999.99."),
        ("-0.01", "Must be greater than or equal to 0 and less than or equal to 9999999999.99."),
        ("1e-30", "Use at most two decimal places."),
        ("nan", "Special numeric values (nan or infinity) are not permitted."),
        ("inf", "Special numeric values (nan or infinity) are not permitted."),
        ("twelve", "Not a valid number."),
        ("", "Not a valid number."),
    ],
)
async def test_create_course_refuses_a_price_that_is_not_one(
    price: str, reason: str, database_url: str, workdir: Path, engine: AsyncEngine
) -> None:
    before = await count(engine, "courses")
    result = await asyncio.to_thread(
        run, "create-course", "go-101", "--title", "Go", f"--price={price}", "--currency", "EUR",
        env={"RPC_SERVER_DATABASE_URL": database_url}, cwd=workdir,
    )  # fmt: skip
    assert one_error_line(result, 2) == f"error: --price: {reason}"
    assert await count(engine, "courses") == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("mail-retry", "x"), "argument id: expected a message id from 1 to"),
        (("mail-retry", "99999999999999999999"), "argument id: expected a message id from 1"),
        (("mail-status", "--limit", "-5"), "argument --limit: expected a whole number from 1"),
        (("serve", "--port", "70000"), "argument --port: expected a port from 1 to 65535"),
        (("serve", "--workers", "0"), "argument --workers: expected a number of worker"),
        (("create-token",), "the following arguments are required: email"),
        (("no-such-command",), "argument COMMAND: invalid choice: 'no-such-command'"),
    ],
    ids=["id-text", "id-huge", "limit", "port", "workers", "missing", "command"],
)
def test_a_bad_flag_is_one_line_naming_it(
    args: tuple[str, ...], message: str, workdir: Path
) -> None:
    result = run(*args, env={}, cwd=workdir)
    line = one_error_line(result, 2)
    assert message in line
    assert line.endswith("--help)")
    assert list(workdir.iterdir()) == []


async def receipt_of_a_fulfilled_purchase(uow_factory: SqlUnitOfWorkFactory, world: World) -> None:
    """Fulfil a purchase of alice's (the payment backend reports it): one pending receipt,
    which no deliverer sends (no server runs)."""
    purchase = await services.create_purchase(
        uow_factory, world.alice.actor, course="python-basics"
    )
    await services.fulfill_purchase(
        uow_factory, world.payments.actor, FrontendLinks(FRONTEND_URL),
        purchase_id=purchase.purchase_id, purchase_state=PurchaseState.FULFILLED,
        verifier=PaymentSignatures(()),
    )  # fmt: skip


async def outbox_ids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT id FROM receipt_outbox ORDER BY id"))
        return [int(row[0]) for row in rows]


async def test_mail_retry_tells_a_missing_message_from_one_that_is_not_dead(
    database_url: str,
    workdir: Path,
    world: World,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    await receipt_of_a_fulfilled_purchase(uow_factory, world)
    [pending] = await outbox_ids(engine)
    env = {"RPC_SERVER_DATABASE_URL": database_url}
    missing = await asyncio.to_thread(run, "mail-retry", str(pending + 1000), env=env, cwd=workdir)
    assert one_error_line(missing, 1) == (
        f"error: no message {pending + 1000} (see rpc-server mail-status)"
    )
    alive = await asyncio.to_thread(run, "mail-retry", str(pending), env=env, cwd=workdir)
    assert one_error_line(alive, 1) == (
        f"error: message {pending} is not dead, it is pending: only dead messages are requeued"
    )


class RefusingMailer:
    """A mail server that refuses every recipient for good."""

    async def send(self, message: Any) -> None:
        raise PermanentMailError("recipient refused: 550 no such user")

    async def close(self) -> None:
        pass


async def test_mail_status_shows_when_a_dead_receipt_died(
    database_url: str, workdir: Path, world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    await receipt_of_a_fulfilled_purchase(uow_factory, world)
    before = datetime.now(UTC).replace(microsecond=0)
    # The deliverer claims it for a 5-minute lease, then the server refuses it for good.
    deliverer = ReceiptDeliverer(
        uow_factory, RefusingMailer(), mail_from="shop@example.com", lease_seconds=300
    )
    assert await deliverer.deliver_due() == 1
    after = services.utcnow()

    result = await asyncio.to_thread(
        run, "mail-status", env={"RPC_SERVER_DATABASE_URL": database_url}, cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "pending: 0  sent: 0  dead: 1"
    fields = lines[1].split()
    assert fields[1:3] == ["dead", "attempts=1"]
    assert fields[3] == "died"
    died = datetime.strptime(f"{fields[4]} {fields[5]}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert fields[6] == "UTC"
    # When it died, not when its lease would have ended (a time in the future).
    assert before <= died <= after
