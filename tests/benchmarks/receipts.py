"""The receipts benchmark: does the project's receipt deliverer keep up with fulfils?

Run as the ``receipts`` workload of ``python -m tests.benchmarks.run`` (after the other
workloads of an engine, whose servers are stopped first: another project process on the
same database would deliver receipts too). The project runs alone, a fresh
``rpc-server serve`` per measurement, with its defaults on, in three settings
(variants, in this order each round):

- ``file``: the deliverer in ``serve`` with the file mailer (the default backend), into
  a directory of its own;
- ``smtp``: the deliverer sending by SMTP to a local aiosmtpd sink (smtp_sink.py, its own
  process on the load's CPUs), ``RPC_SERVER_SMTP_URL=smtp://127.0.0.1:PORT?starttls=0``;
- ``off``: ``RPC_SERVER_MAIL_IN_SERVE=false``, the same fulfils with no deliverer: the
  latency the other two are compared with. Its receipts are then put off to 2100
  (``Bulk.park_outbox``), so that no later deliverer sends them.

Each: a warm-up of fulfils (then its receipts are drained), then ``purchase.fulfill`` by
the payment backend at saturation for ``--receipts-duration`` seconds (default 60) with
wrk, each purchase once. The outbox is read every second during the load (receipts
sent, receipts still to send). Reported: fulfils/s and their p50/p99, receipts sent per
second during the load, the backlog when the load stopped, the seconds until it was 0
(polled every 0.25 s), and what left the server (``.eml`` files, or the sink's count).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks import loadgen, seed, servers
from tests.benchmarks.report import ReceiptsRun
from tests.benchmarks.workloads import WORKLOADS, PlanContext, build_plan
from tests.processes import free_port

WORKLOAD = WORKLOADS["receipts"]
BACKENDS = WORKLOAD.variants
POLL = 0.25
SAMPLE_EVERY = 1.0
# Guess of the fulfil rate before one is measured (for how many pending purchases to
# prepare), and the margin over a measured one.
FIRST_GUESS_RPS = 2000.0
MARGIN = 1.5


async def wait_outbox_drained(bulk: seed.Bulk, within: float) -> tuple[int, float]:
    """Wait until none of the project's receipts is left to send (or ``within`` seconds
    have passed); return (receipts to send at the start, seconds waited: infinite when
    some were still left)."""
    started = time.monotonic()
    first = backlog = (await bulk.outbox()).backlog
    while backlog:
        if time.monotonic() - started > within:
            return first, math.inf
        await asyncio.sleep(POLL)
        backlog = (await bulk.outbox()).backlog
    return first, (time.monotonic() - started) if first else 0.0


@dataclass
class Sink:
    """The SMTP sink's process (smtp_sink.py)."""

    directory: Path
    cpus: set[int] | None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def count_path(self) -> Path:
        return self.directory / f"smtp-sink-{self.port}.count"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?starttls=0"

    def start(self, timeout: float = 30) -> None:
        cpus = self.cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        command = [sys.executable, "-m", "tests.benchmarks.smtp_sink", "--port", str(self.port)]
        command += ["--count-to", str(self.count_path)]
        with (self.directory / "smtp-sink.log").open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=servers.REPO,
                preexec_fn=pin,
            )
        deadline = time.monotonic() + timeout
        while not self.count_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the SMTP sink did not start (see smtp-sink.log)")
            time.sleep(0.05)

    def count(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return int(self.count_path.read_text())
        return 0

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    rounds: int
    backends: tuple[str, ...]
    connections: int
    threads: int
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    project_env: Mapping[str, str]
    drain_limit: float


async def measure(
    engine: str,
    dataset: seed.Dataset,
    context: PlanContext,
    directory: Path,
    options: Options,
    *,
    known_rate: float | None,
    log: Callable[[str], None],
    notes: list[str],
) -> list[ReceiptsRun]:
    """Every backend, round after round; the warm-ups are kept as round 0."""
    runs: list[ReceiptsRun] = []
    rate = known_rate or FIRST_GUESS_RPS
    for round_ in range(1, options.rounds + 1):
        for backend in options.backends:
            warm, run = await _measure_one(
                engine, dataset, context, directory, options, backend, round_, rate, log, notes
            )
            runs += [warm, run]
            rate = max(rate, run.fulfils_per_s)
    return runs


async def _measure_one(
    engine: str,
    dataset: seed.Dataset,
    context: PlanContext,
    directory: Path,
    options: Options,
    backend: str,
    round_: int,
    rate: float,
    log: Callable[[str], None],
    notes: list[str],
) -> tuple[ReceiptsRun, ReceiptsRun]:
    name = f"receipts-{engine}-{backend}-r{round_}"
    mail_dir = directory / f"mail-{name}"
    env = {**options.project_env, "RPC_SERVER_MAIL_DIR": str(mail_dir)}
    sink = None
    if backend == "smtp":
        sink = Sink(directory, options.load_cpus)
        sink.start()
        env["RPC_SERVER_SMTP_URL"] = sink.url
    elif backend == "off":
        env["RPC_SERVER_MAIL_IN_SERVE"] = "false"
    server = servers.project_server(dataset.url, directory, options.server_cpus, env, name=name)
    try:
        server.start()
        warm = await _load(
            engine, dataset, context, options, server, backend, 0, options.warmup, rate,
            mail_dir, sink,
        )  # fmt: skip
        run = await _load(
            engine, dataset, context, options, server, backend, round_, options.duration,
            max(rate, warm.fulfils_per_s), mail_dir, sink,
        )  # fmt: skip
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
    if backend == "off":
        parked = await dataset.bulk.park_outbox()
        log(f"    {parked:,} receipts of the run without deliverer put off to 2100")
    for measured in (warm, run):
        if measured.errors or measured.exhausted:
            what = "warm-up" if measured.round == 0 else f"round {measured.round}"
            notes.append(
                f"{engine} receipts {backend} {what}: errors {measured.errors}, "
                f"exhausted {measured.exhausted}"
            )
    drain = "—" if math.isnan(run.drain_s) else f"{run.drain_s:.1f} s"
    log(
        f"  round {round_} {backend:>4}: {run.seconds:5.1f} s {run.fulfils_per_s:7,.0f} "
        f"fulfils/s  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
        f"receipts {run.receipts_per_s:7,.0f}/s during the load  to send at stop "
        f"{run.backlog_at_stop:,}  drained in {drain}  sent {run.sent_in_all:,} "
        f"(seen {run.delivered_seen:,})  CPU {run.cpu_us_per_fulfil:,.0f} µs/fulfil  "
        f"errors {run.errors} exhausted {run.exhausted}"
    )
    return warm, run


def _delivered(mail_dir: Path, sink: Sink | None) -> int:
    if sink is not None:
        return sink.count()
    if not mail_dir.is_dir():
        return 0
    return sum(1 for path in mail_dir.iterdir() if path.suffix == ".eml")


async def _load(
    engine: str,
    dataset: seed.Dataset,
    context: PlanContext,
    options: Options,
    server: servers.ServerProcess,
    backend: str,
    round_: int,
    seconds: float,
    rate: float,
    mail_dir: Path,
    sink: Sink | None,
) -> ReceiptsRun:
    fresh = math.ceil(rate * MARGIN * (seconds + 1)) + 1000
    label = f"{engine}-receipts-{backend}-r{round_}"
    script, plan = await build_plan(context, WORKLOAD, backend, label=label, fresh_count=fresh)
    planned = context.last_pending
    bulk = dataset.bulk
    before = await bulk.outbox()
    seen_before = _delivered(mail_dir, sink)
    timeline: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    started = time.monotonic()

    async def sample() -> None:
        while not stop.is_set():
            counts = await bulk.outbox()
            timeline.append((round(time.monotonic() - started, 2), counts.sent, counts.backlog))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)

    server.reset_peak()
    cpu_before = server.cpu_seconds()
    sampler = asyncio.create_task(sample())
    try:
        result = await loadgen.run_wrk(
            server.url,
            script=script,
            plan=plan,
            result=plan.with_suffix(".json"),
            seconds=seconds,
            connections=options.connections,
            threads=options.threads,
            cpus=options.load_cpus,
        )
    finally:
        stop.set()
        await sampler
    at_stop = await bulk.outbox()
    cpu_seconds = server.cpu_seconds() - cpu_before
    peak = server.peak_rss_kib()
    if not server.alive():
        raise RuntimeError(f"the project server died:\n{server.log_tail()}")
    timeline.append((round(time.monotonic() - started, 2), at_stop.sent, at_stop.backlog))
    if backend == "off":
        drain = math.nan
        await server.wait_idle()
    else:
        _first, drain = await wait_outbox_drained(bulk, options.drain_limit)
        # Requests wrk dropped in flight still commit (and queue receipts) after that.
        await server.wait_idle()
        await wait_outbox_drained(bulk, options.drain_limit)
    after = await bulk.outbox()
    if options.threads == 1:  # ids past those wrk can have sent go back to the pool
        seed.give_back(dataset, planned[result.requests + 2 * options.connections + 100 :])
    sent_during = at_stop.sent - before.sent
    return ReceiptsRun(
        engine=engine,
        backend=backend,
        round=round_,
        seconds=result.seconds,
        fulfils=result.requests,
        fulfils_per_s=result.rps,
        p50_ms=result.p50_ms,
        p90_ms=result.p90_ms,
        p99_ms=result.p99_ms,
        errors=result.socket_errors + result.http_errors + result.rpc_errors,
        exhausted=result.exhausted,
        sent_during_load=sent_during,
        receipts_per_s=sent_during / result.seconds if result.seconds else math.nan,
        backlog_at_stop=at_stop.backlog,
        drain_s=drain,
        sent_in_all=after.sent - before.sent,
        delivered_seen=_delivered(mail_dir, sink) - seen_before,
        cpu_us_per_fulfil=cpu_seconds * 1e6 / result.requests if result.requests else math.nan,
        peak_rss_mib=peak / 1024,
        timeline=timeline,
    )
