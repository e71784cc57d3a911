"""The receipt outbox port: the fake keeps the port's contract, the outbox services and
the deliverer work through the port alone, and ``OutboxStatus`` is the database's list.

The same contract runs on SQL in ``tests/integration/test_outbox_port_sql.py``.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from mypy import api as mypy

from models import ReceiptOutbox
from models.tables import OUTBOX_STATUSES
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.outbox import OutboxStatus
from rpc_server.mail.deliverer import ReceiptDeliverer, RetryPolicy
from rpc_server.mail.mailer import PermanentMailError, TemporaryMailError
from rpc_server.mail.receipts import message_id_for
from tests.unit.conftest import FakeWorld
from tests.unit.fakes import CheckViolation, FixedClock, ReceiptRow
from tests.unit.outbox_contract import (
    CHECKS,
    DEAD,
    PENDING,
    SENT,
    Check,
    OutboxWorld,
    claim,
    entries,
    queue_receipts,
    settle,
)

ROOT = Path(__file__).parents[2]
FAKES = Path(__file__).with_name("fakes.py")
MAIL_FROM = "Course Shop <receipts@shop.example>"


@pytest.fixture
def world(fake: FakeWorld) -> OutboxWorld:
    return OutboxWorld(fake.uow, alice=fake.alice, bob=fake.bob, payments=fake.payments)


# --- the fake keeps the port's contract ----------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
async def test_the_fake_outbox_keeps_the_contract(check: Check, world: OutboxWorld) -> None:
    await check(world)


def test_the_fakes_type_check_as_the_ports(tmp_path: Path) -> None:
    """mypy --strict on fakes.py (``as_port`` returns the fake factory as the port): every
    fake repository has its port's whole shape. A fake outbox missing a method fails."""
    options = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path)]
    checked = mypy.run([*options, str(FAKES)])
    assert checked[2] == 0, checked[0]

    source = FAKES.read_text()
    assert "    async def requeue(" in source
    broken = tmp_path / "fakes.py"
    broken.write_text(source.replace("    async def requeue(", "    async def requeue_gone("))
    failed = mypy.run([*options, str(broken)])
    assert failed[2] == 1
    assert 'expected "UnitOfWorkFactory"' in failed[0], failed[0]


def test_the_statuses_are_the_ones_the_database_checks() -> None:
    assert tuple(status.value for status in OutboxStatus) == OUTBOX_STATUSES
    [check] = [
        c for c in ReceiptOutbox.__table__.constraints if c.name == "ck_receipt_outbox_status_known"
    ]
    assert str(check.sqltext) == "status IN ('pending', 'sent', 'dead')"  # type: ignore[attr-defined]


def test_a_fake_row_with_another_status_is_refused(clock: FixedClock) -> None:
    """The fake's stand-in for the CHECK constraint."""
    with pytest.raises(CheckViolation):
        ReceiptRow(1, 1, "a@example.com", clock(), clock(), status="bogus")  # type: ignore[arg-type]
    assert ReceiptRow(1, 1, "a@example.com", clock(), clock()).status is PENDING


# --- the operator's services (rpc-server mail-status, mail-retry) ---------------------------


async def test_the_overview_counts_every_status_and_lists_the_newest(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    empty = await services.outbox_overview(fake.uow, limit=10)
    assert (list(empty.counts.items()), empty.entries) == ([(PENDING, 0), (SENT, 0), (DEAD, 0)], [])

    _, second = await queue_receipts(world, clock(), clock())
    [job, _] = await claim(world, clock(), "t")
    assert await settle(world, job, "t", SENT, clock())
    overview = await services.outbox_overview(fake.uow, limit=1)
    assert dict(overview.counts) == {PENDING: 1, SENT: 1, DEAD: 0}
    assert [entry.purchase_id for entry in overview.entries] == [second]
    assert fake.uow.opened[-1] is False  # a read: no write lock for an overview


async def test_requeue_receipt_requeues_a_dead_message_and_says_what_kept_any_other(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    dead, pending = await queue_receipts(world, clock(), clock())
    jobs = {job.receipt.purchase_id: job for job in await claim(world, clock(), "t")}
    assert await settle(world, jobs[dead], "t", DEAD, clock(), error="550")
    commits = fake.uow.commits

    assert await services.requeue_receipt(fake.uow, jobs[pending].outbox_id) is PENDING
    with pytest.raises(NotFound) as missing:
        await services.requeue_receipt(fake.uow, 999)
    assert missing.value.data == {"outbox_id": 999}
    assert fake.uow.commits == commits, "nothing was requeued"

    later = clock.advance(30)
    assert await services.requeue_receipt(fake.uow, jobs[dead].outbox_id, clock=clock) is None
    assert fake.uow.commits == commits + 1
    requeued = (await entries(world))[dead]
    assert (requeued.status, requeued.attempts, requeued.next_attempt_at) == (PENDING, 0, later)
    assert await services.requeue_receipt(fake.uow, jobs[dead].outbox_id) is PENDING


# --- the deliverer, on the port alone ------------------------------------------------------


class ScriptedMailer:
    """Raises the scripted errors in turn, then accepts; ``on_send`` runs at each send."""

    def __init__(self, *failures: Exception):
        self.failures = list(failures)
        self.sent: list[EmailMessage] = []
        self.on_send = lambda: None

    async def send(self, message: EmailMessage) -> None:
        self.on_send()
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(message)

    async def close(self) -> None:
        pass


def deliverer_for(fake: FakeWorld, mailer: ScriptedMailer, clock: FixedClock) -> ReceiptDeliverer:
    return ReceiptDeliverer(
        fake.uow,
        mailer,
        mail_from=MAIL_FROM,
        retry=RetryPolicy(max_attempts=2, base_seconds=10, cap_seconds=10),
        clock=clock,
    )


async def test_the_deliverer_sends_and_records_it(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    [purchase_id] = await queue_receipts(world, clock())
    mailer = ScriptedMailer()
    assert await deliverer_for(fake, mailer, clock).deliver_due() == 1
    [message] = mailer.sent
    assert message["Message-ID"] == message_id_for(purchase_id, MAIL_FROM)
    entry = (await entries(world))[purchase_id]
    assert (entry.status, entry.attempts, entry.sent_at) == (SENT, 1, clock())


async def test_the_deliverer_backs_off_then_gives_up(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    [purchase_id] = await queue_receipts(world, clock())
    mailer = ScriptedMailer(TemporaryMailError("busy"), TemporaryMailError("still busy"))
    deliverer = deliverer_for(fake, mailer, clock)
    assert await deliverer.deliver_due() == 1
    entry = (await entries(world))[purchase_id]
    assert (entry.status, entry.attempts, entry.last_error) == (PENDING, 1, "busy")
    # Equal jitter: between half the delay and the delay after the first failure.
    retry_at = entry.next_attempt_at
    assert clock() + timedelta(seconds=5) <= retry_at <= clock() + timedelta(seconds=10)
    assert await deliverer.deliver_due() == 0, "not due yet"

    clock.advance(10)
    assert await deliverer.deliver_due() == 1
    entry = (await entries(world))[purchase_id]
    assert (entry.status, entry.attempts, entry.last_error) == (DEAD, 2, "still busy")
    assert entry.next_attempt_at == clock()  # when it died
    assert mailer.sent == []


async def test_a_permanent_failure_is_dead_at_once(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    [purchase_id] = await queue_receipts(world, clock())
    mailer = ScriptedMailer(PermanentMailError("550 no such user"))
    assert await deliverer_for(fake, mailer, clock).deliver_due() == 1
    entry = (await entries(world))[purchase_id]
    assert (entry.status, entry.attempts, entry.last_error) == (DEAD, 1, "550 no such user")


async def test_a_stopping_deliverer_gives_back_what_it_did_not_attempt(
    world: OutboxWorld, fake: FakeWorld, clock: FixedClock
) -> None:
    first, second = await queue_receipts(world, clock(), clock())
    mailer = ScriptedMailer()
    deliverer = deliverer_for(fake, mailer, clock)
    mailer.on_send = deliverer.stop  # stopped while sending the first
    assert await deliverer.deliver_due() == 1
    found = await entries(world)
    assert (found[first].status, found[first].attempts) == (SENT, 1)
    assert (found[second].status, found[second].attempts) == (PENDING, 0)
    assert found[second].next_attempt_at == clock(), "due again at once"


def test_the_deliverer_loads_nothing_of_the_database_layer() -> None:
    """It depends on the ports: importing it loads neither ``rpc_server.db`` nor
    SQLAlchemy nor the models."""
    probe = (
        "import sys, rpc_server.mail.deliverer; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'models')"
        " or m.startswith('rpc_server.db')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert loaded == "[]"
