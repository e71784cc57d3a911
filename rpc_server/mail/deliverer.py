"""The receipt deliverer: claims due outbox rows, sends them, records the outcome.

Runs inside ``rpc-server serve`` (woken right after a fulfillment commits, polling as a
fallback) or alone as ``rpc-server send-mail``. Rows are claimed (50, more while a
backlog lasts) under a lease in a short transaction, sent several at a time with no
transaction open (SQLite's write lock is never held across SMTP; SMTP connections are
kept open between messages), then settled together in one transaction, each only if the
claim is still ours (the sent ones by one statement, recorded as sent when the claim is
settled). The lease is short (15 s by default) and renewed while the sends go on: a
deliverer that dies mid-send leaves its rows due again within the lease, for itself
after a restart or for another process. At worst a receipt is sent twice, with the same
Message-ID, never lost.

Retry timing is stored in the row (``next_attempt_at``), so it survives restarts; that
is why it is computed here rather than by an in-process retry library.

It works through the ports alone (``UnitOfWorkFactory``, ``ReceiptOutboxRepository``,
``Mailer``): nothing here knows which database holds the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from rpc_server.config import Settings
from rpc_server.domain.outbox import OutboxStatus, ReceiptJob
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.services import Clock, utcnow
from rpc_server.mail.mailer import Mailer, PermanentMailError, TemporaryMailError, mailer_for
from rpc_server.mail.receipts import build_receipt

if TYPE_CHECKING:  # imported when used (rpc_server.observability.metrics says why)
    from rpc_server.observability.metrics import Metrics
    from rpc_server.observability.tracing import Tracing

log = logging.getLogger("rpc_server.mail.deliverer")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to ``max_attempts`` sends in all."""

    max_attempts: int = 8
    base_seconds: float = 30.0
    cap_seconds: float = 3600.0

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed send ("equal jitter")."""
        exponent = min(max(0, attempts - 1), 64)  # past 2**64 the cap has long won
        delay = min(self.cap_seconds, self.base_seconds * 2.0**exponent)
        return random.uniform(delay / 2, delay)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one claimed send went, to be recorded with the others of its claim."""

    job: ReceiptJob
    status: OutboxStatus
    at: datetime
    retry_at: datetime | None = None
    error: str | None = None


class ReceiptDeliverer:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        mailer: Mailer,
        *,
        mail_from: str,
        retry: RetryPolicy = RetryPolicy(),
        lease_seconds: float = 15.0,
        poll_seconds: float = 5.0,
        batch_size: int = 50,
        max_claim: int = 800,
        concurrency: int = 8,
        gather_seconds: float = 0.05,
        clock: Clock = utcnow,
        outage: Callable[[BaseException], bool] = lambda _error: False,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ):
        """``batch_size``: receipts claimed at once; after a full claim the next one
        claims twice as many, up to ``max_claim``, and after one that was not full,
        ``batch_size`` again. A claim and its settlement are two write transactions,
        each of which, on SQLite, waits its turn behind the calls that write: with a
        backlog under a steady stream of fulfilments, bigger claims are what lets the
        deliverer keep up (measured: 0.77 receipts a fulfil with claims of 50 at 712
        fulfils/s). ``concurrency``: messages of one claim sent at the same time;
        ``gather_seconds``: how long receipts gather after a claim that was not full
        before the next claim. ``outage``:
        whether an error means the database is not there right now (a warning, waited
        out), rather than a fault worth a traceback. ``metrics``: counts each attempt
        by outcome; ``tracing``: a span per send, in the trace of the call that queued
        the receipt (``rpc_server.observability``)."""
        self.uow_factory = uow_factory
        self.mailer = mailer
        self.mail_from = mail_from
        self.retry = retry
        self.lease = timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.max_claim = max_claim
        self._full_claims = 0  # claims in a row that found as many as they asked for
        self.concurrency = concurrency
        self.gather_seconds = gather_seconds
        self.clock = clock
        self.outage = outage
        self.metrics = metrics
        self.tracing = tracing
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Deliver now rather than at the next poll (called after receipts commit)."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the messages being sent, then return from ``run``."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        """Deliver until stopped; database or mail trouble is logged and retried.

        Mail connections stay open while there is work, and are closed whenever
        nothing is due."""
        try:
            await self._run()
        finally:
            await self.mailer.close()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                handled = await self._deliver_due()
            except Exception as error:
                if self.outage(error):
                    log.warning(
                        "delivering receipts paused, database unavailable (%s); retrying in %ss",
                        type(error).__name__,
                        self.poll_seconds,
                    )
                else:
                    log.exception("delivering receipts failed; retrying in %ss", self.poll_seconds)
                handled = 0
            if self._stopping:
                continue
            if handled:
                if handled < self.batch_size:
                    # Caught up: let the next receipts gather for a moment rather than
                    # claim each one as its fulfilment commits. Under a steady stream of
                    # fulfilments that is a few claims (two write transactions each) a
                    # second instead of one per fulfilment, and on SQLite fewer waits
                    # for the write lock for everyone.
                    await self._gather_pause()
                continue
            await self.mailer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def _gather_pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.gather_seconds)

    async def deliver_due(self) -> int:
        """One pass: claim due messages, send them (``concurrency`` at a time), record
        their outcomes in one transaction. Returns how many were handled.

        The claim's lease is renewed while its sends go on, so it can be short: the
        messages of a deliverer that died are due again within ``lease_seconds``.
        """
        try:
            return await self._deliver_due()
        finally:
            await self.mailer.close()

    async def _deliver_due(self) -> int:
        token = uuid.uuid4().hex
        now = self.clock()
        limit = max(min(self.batch_size << min(self._full_claims, 16), self.max_claim), 1)
        async with self.uow_factory(write=True) as uow:
            jobs = await uow.receipts.claim_due(
                now=now, lease_until=now + self.lease, token=token, limit=limit
            )
            await uow.commit()
        # A full claim: more are waiting, claim twice as many next time.
        self._full_claims = self._full_claims + 1 if len(jobs) == limit else 0
        if not jobs:
            return 0
        renewal = asyncio.create_task(self._renew(token))
        try:
            outcomes = await self._send_all(jobs)
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
        sent = [o.job.outbox_id for o in outcomes if o.status is OutboxStatus.SENT]
        async with self.uow_factory(write=True) as uow:
            # The sends that went out in one statement (the usual case: one round trip
            # per claim); retries and dead letters one by one, with their own times.
            settled = await uow.receipts.settle_sent(sent, token=token, now=self.clock())
            for outcome in outcomes:
                if outcome.status is not OutboxStatus.SENT and await uow.receipts.settle(
                    outcome.job.outbox_id, token=token, status=outcome.status, now=outcome.at,
                    next_attempt_at=outcome.retry_at, error=outcome.error,
                ):  # fmt: skip
                    settled.add(outcome.job.outbox_id)
            if len(outcomes) < len(jobs):  # stopping: give back what was not attempted
                await uow.receipts.release(token, now=self.clock())
            await uow.commit()
        for outcome in outcomes:
            if outcome.job.outbox_id not in settled:
                log.warning(
                    "receipt %s: lease expired before the outcome was recorded",
                    outcome.job.outbox_id,
                )
        return len(outcomes)

    async def deliver_all(self) -> int:
        """Deliver everything that is due now; return how many were handled."""
        total = 0
        try:
            while handled := await self._deliver_due():
                total += handled
        finally:
            await self.mailer.close()
        return total

    async def _send_all(self, jobs: list[ReceiptJob]) -> list[Outcome]:
        """Send the claimed messages, ``concurrency`` at a time, in claim order; once
        stopping, the ones not started are left out.

        ``concurrency`` senders take the next message each when free, rather than a task
        per message waiting on a semaphore: a claim holds up to ``max_claim`` of them."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        pending = iter(range(len(jobs)))

        async def sender() -> None:
            for index in pending:
                if self._stopping:
                    return
                outcomes[index] = await self._send(jobs[index])

        await asyncio.gather(*(sender() for _ in range(min(self.concurrency, len(jobs)))))
        return [outcome for outcome in outcomes if outcome is not None]

    async def _renew(self, token: str) -> None:
        """Extend the claim's lease every third of it, until cancelled."""
        period = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            try:
                async with self.uow_factory(write=True) as uow:
                    await uow.receipts.renew(token, lease_until=self.clock() + self.lease)
                    await uow.commit()
            except Exception as error:  # the sends go on; settling checks the claim
                log.warning("receipt lease not renewed (%s); retrying", type(error).__name__)

    async def _send(self, job: ReceiptJob) -> Outcome:
        if self.tracing is None:
            outcome = await self._send_one(job)
        else:
            with self.tracing.receipt_span(job.trace_context, job.outbox_id) as span:
                outcome = await self._send_one(job)
                span.set_attribute("rpc_server.receipt.outcome", _ATTEMPT_OUTCOMES[outcome.status])
        if self.metrics is not None:
            self.metrics.observe_receipt_attempt(_ATTEMPT_OUTCOMES[outcome.status])
        return outcome

    async def _send_one(self, job: ReceiptJob) -> Outcome:
        status: OutboxStatus = OutboxStatus.SENT
        retry_at: datetime | None = None
        error: str | None = None
        try:
            message = build_receipt(job.receipt, mail_from=self.mail_from)
        except ValueError as exc:  # e.g. an address the email library refuses
            status, error = OutboxStatus.DEAD, f"cannot build the receipt: {exc}"
        else:
            try:
                await self.mailer.send(message)
            except PermanentMailError as exc:
                status, error = OutboxStatus.DEAD, str(exc)
            except TemporaryMailError as exc:
                status, error = OutboxStatus.PENDING, str(exc)
            except Exception as exc:  # a bug in a mailer must not stop the deliverer
                log.exception("unexpected error sending receipt %s", job.outbox_id)
                status, error = OutboxStatus.PENDING, f"unexpected error: {type(exc).__name__}"
        now = self.clock()
        if status is OutboxStatus.PENDING:
            if job.attempts >= self.retry.max_attempts:
                status = OutboxStatus.DEAD
            else:
                retry_at = now + timedelta(seconds=self.retry.delay_after(job.attempts))
        self._log(job, status, error, retry_at)
        return Outcome(job, status, now, retry_at, error)

    @staticmethod
    def _log(
        job: ReceiptJob, status: OutboxStatus, error: str | None, retry_at: datetime | None
    ) -> None:
        purchase = job.receipt.purchase_id
        if status is OutboxStatus.SENT:
            log.info("receipt for purchase %s sent (attempt %d)", purchase, job.attempts)
        elif status is OutboxStatus.DEAD:
            log.error("receipt for purchase %s is dead after %d attempts: %s",
                      purchase, job.attempts, error)  # fmt: skip
        else:
            log.warning("receipt for purchase %s failed (attempt %d), retry at %s: %s",
                        purchase, job.attempts, retry_at, error)  # fmt: skip


# An attempt's outcome as the metrics and spans name it.
_ATTEMPT_OUTCOMES = {
    OutboxStatus.SENT: "sent", OutboxStatus.PENDING: "retry", OutboxStatus.DEAD: "dead",
}  # fmt: skip


def build_deliverer(
    settings: Settings,
    uow_factory: UnitOfWorkFactory,
    *,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> ReceiptDeliverer:
    """The deliverer the settings describe (mailer, retries, lease, poll interval), on
    the server's database (whose outages it waits out with a warning)."""
    from rpc_server.db.errors import database_unavailable  # the SQL side, composed here

    return ReceiptDeliverer(
        uow_factory,
        mailer_for(settings.smtp_url, settings.mail_dir, keep_open=settings.mail_concurrency),
        mail_from=settings.mail_from,
        retry=RetryPolicy(
            max_attempts=settings.mail_max_attempts,
            base_seconds=settings.mail_retry_base,
            cap_seconds=settings.mail_retry_cap,
        ),
        lease_seconds=settings.mail_lease,
        poll_seconds=settings.mail_poll_interval,
        concurrency=settings.mail_concurrency,
        outage=database_unavailable,
        metrics=metrics,
        tracing=tracing,
    )
