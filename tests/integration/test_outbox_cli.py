"""``send-mail``, ``mail-status`` and ``mail-retry``, run as an operator runs them.

Each test has its own SQLite file and mail directory, named by environment variables.
``seed-demo`` makes one fulfilled purchase (alice's "Async Python in Practice"), so
one receipt is waiting.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpc_server.config import Settings
from rpc_server.db.engines import open_engine
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import PurchaseState
from tests.conftest import sqlite_url
from tests.integration.paying import pay_and_fulfil
from tests.integration.smtp_server import HOST, SmtpServer, free_port

RPC_SERVER = str(Path(sys.executable).parent / "rpc-server")
ALICE = "alice@example.com"


class Operator:
    """Runs ``rpc-server`` against one database and mail directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.database = workdir / "shop.sqlite3"
        self.mail_dir = workdir / "mail"
        self.env = {
            **os.environ,
            "RPC_SERVER_DATABASE_URL": sqlite_url(self.database),
            "RPC_SERVER_MAIL_DIR": str(self.mail_dir),
        }
        self.env.pop("RPC_SERVER_SMTP_URL", None)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RPC_SERVER, *args],
            cwd=self.workdir,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str, **env: str) -> str:
        result = self.run(*args, **env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def status(self) -> str:
        return self.ok("mail-status")

    def mail_files(self) -> list[Path]:
        return sorted(self.mail_dir.glob("*.eml")) if self.mail_dir.exists() else []


@pytest.fixture(scope="session")
def seeded_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``seed-demo`` run once; each test works on a copy of its database."""
    seeding = Operator(tmp_path_factory.mktemp("seeded"))
    seeding.ok("seed-demo")
    return seeding.database


@pytest.fixture
def operator(tmp_path: Path, seeded_database: Path) -> Operator:
    operator = Operator(tmp_path)
    for suffix in ("", "-wal"):  # the WAL is checkpointed away on exit; copy it if not
        source = seeded_database.with_name(seeded_database.name + suffix)
        if source.exists():
            shutil.copy(source, operator.database.with_name(operator.database.name + suffix))
    return operator


def entry_line(status_output: str, status: str) -> re.Match[str]:
    match = re.search(rf"^\s*(?P<id>\d+)\s+{status}\s+attempts=(?P<attempts>\d+).*$",
                      status_output, re.MULTILINE)  # fmt: skip
    assert match is not None, status_output
    return match


def test_send_mail_once_sends_the_pending_receipt(operator: Operator) -> None:
    before = operator.status()
    assert before.splitlines()[0] == "pending: 1  sent: 0  dead: 0"
    pending = entry_line(before, "pending")
    assert pending["attempts"] == "0"
    assert f"to={ALICE}" in pending[0]

    sent = operator.ok("send-mail", "--once")
    assert "1 receipt(s) handled" in sent
    [path] = operator.mail_files()
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == ALICE
    assert "Async Python in Practice" in message["Subject"]
    assert message["From"] == Settings().mail_from

    after = operator.status()
    assert after.splitlines()[0] == "pending: 0  sent: 1  dead: 0"
    assert entry_line(after, "sent")["id"] == pending["id"]


def test_rejected_receipt_is_listed_dead_and_mail_retry_requeues_it(operator: Operator) -> None:
    smtp = SmtpServer()
    smtp.reject(ALICE)
    smtp.start()
    try:
        handled = operator.ok("send-mail", "--once", RPC_SERVER_SMTP_URL=smtp.url)
    finally:
        smtp.stop()
    assert "1 receipt(s) handled" in handled
    assert smtp.rcpt_attempts == [ALICE]

    status = operator.status()
    assert status.splitlines()[0] == "pending: 0  sent: 0  dead: 1"
    dead = entry_line(status, "dead")
    assert dead["attempts"] == "1"
    assert "last_error=recipient refused: 550 5.1.1 no such user" in dead[0]

    outbox_id = dead["id"]
    retried = operator.run("mail-retry", outbox_id)
    assert retried.returncode == 0, retried.stderr
    assert f"message {outbox_id} requeued" in retried.stdout
    status = operator.status()
    assert status.splitlines()[0] == "pending: 1  sent: 0  dead: 0"
    assert entry_line(status, "pending")["attempts"] == "0"

    again = operator.run("mail-retry", outbox_id)  # pending, not dead
    assert again.returncode == 1
    assert f"message {outbox_id} is not dead" in again.stderr

    assert "1 receipt(s) handled" in operator.ok("send-mail", "--once")  # by file, now
    assert len(operator.mail_files()) == 1


def test_unreachable_server_with_one_attempt_allowed_is_dead(operator: Operator) -> None:
    handled = operator.ok(
        "send-mail", "--once",
        RPC_SERVER_SMTP_URL=f"smtp://{HOST}:{free_port()}", RPC_SERVER_MAIL_MAX_ATTEMPTS="1",
    )  # fmt: skip
    assert "1 receipt(s) handled" in handled
    status = operator.status()
    assert status.splitlines()[0] == "pending: 0  sent: 0  dead: 1"
    assert "last_error=SMTP server unreachable" in entry_line(status, "dead")[0]


def test_send_mail_runs_until_sigterm_and_polls_for_new_receipts(operator: Operator) -> None:
    process = subprocess.Popen(
        [RPC_SERVER, "send-mail"],
        cwd=operator.workdir,
        env=operator.env | {"RPC_SERVER_MAIL_POLL_INTERVAL": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_files(operator, 1, process)
        # A receipt committed by another process: no wake-up reaches send-mail, its
        # poll finds it.
        asyncio.run(fulfill_alices_pending_purchase(operator.database))
        wait_for_files(operator, 2, process)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert operator.status().splitlines()[0] == "pending: 0  sent: 2  dead: 0"


def wait_for_files(operator: Operator, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while len(operator.mail_files()) < count:
        assert process.poll() is None, "send-mail exited early"
        assert time.monotonic() < deadline, f"no {count} .eml file(s) in {operator.mail_dir}"
        time.sleep(0.05)


async def fulfill_alices_pending_purchase(database: Path) -> None:
    engine = open_engine(sqlite_url(database))
    try:
        uow_factory = SqlUnitOfWorkFactory(engine)
        alice = await services.authenticate(uow_factory, "demo-alice")
        assert alice is not None
        page = await services.list_purchases(uow_factory, alice, state=PurchaseState.PENDING)
        [purchase] = page.items
        await pay_and_fulfil(uow_factory, alice, purchase)
    finally:
        await engine.close()
