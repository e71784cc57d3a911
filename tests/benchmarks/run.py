"""Benchmarks: the project against bare-aiohttp baselines, interleaved, in one run.

    .venv/bin/python -m tests.benchmarks.run [--engine sqlite|postgresql|both] [--rounds 3]
        [--duration 5] [--workload NAME ...] [--output PATH] [--profile DIR]

For each engine: a fresh database is created and seeded; the project (``rpc-server
serve`` with its defaults on: rate limiter, receipt deliverer, INFO logging), the floor,
the hand-written server and the same-work baselines start in their own processes
pinned to ``--server-cpus``; wrk runs pinned to ``--load-cpus`` with ``--connections``
keep-alive connections. Each workload is checked (all servers give the same answers),
warmed up, then measured round after round, the project and its baselines back to back;
after each of the project's measurements the harness waits until its receipt outbox is
empty and the process idle. The receipts workload (receipts.py) then runs the project
alone. Then the round trips per call are counted on instrumented servers. The report
goes to ``--output`` (Markdown) and stdout. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.benchmarks import loadgen, receipts, report, roundtrips, seed, servers
from tests.benchmarks.report import Measurement, ReceiptsRun
from tests.benchmarks.workloads import (
    WORKLOADS,
    PlanContext,
    Workload,
    build_plan,
    rpc,
    sample_requests,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUTPUT = HERE / "RESULTS.md"
PARTIAL_OUTPUT = Path(tempfile.gettempdir()) / "rpc-bench-RESULTS.md"
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ENGINES = ("sqlite", "postgresql")
# Rates guessed for the first fresh-purchase batch (the warm-up), before one is measured.
FIRST_GUESS_RPS = 3000.0
# The pending purchases seeded for the fulfil plans: the 41,000 at least, and
# enough for every round of the project and the hand-written server at this rate (the
# pool is topped up between measurements when a plan needs more).
POOL_FLOOR = 41_000
POOL_RATE = 1500.0
BASELINE_ROLES = ("floor", "hand-written", "same-work", "same-work-coalesced")
VOLATILE = ("id", "purchase_id", "created_at", "updated_at", "fulfilled_at", "redirect_url")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.run",
        description="Benchmark the project against bare-aiohttp baselines (see README.md).",
    )
    parser.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds per workload")
    parser.add_argument("--duration", type=float, default=5, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per server")
    parser.add_argument(
        "--max-duration",
        type=float,
        default=60,
        help="longest a measurement is stretched to when one request takes long (batches): "
        "a measurement lasts at least 10 times the warm-up's median latency",
    )
    parser.add_argument(
        "--workload", action="append", choices=list(WORKLOADS), help="repeat; default: all"
    )
    parser.add_argument(
        "--headline-only",
        action="store_true",
        help="measure each workload on the project and its headline baseline (hand-written "
        "or floor) only, not on the extra ones (same-work, same-work coalesced)",
    )
    parser.add_argument(
        "--receipts-duration",
        type=float,
        default=60,
        help="seconds of fulfils per measurement of the receipts workload",
    )
    parser.add_argument(
        "--receipts-rounds", type=int, default=1, help="rounds of the receipts workload"
    )
    parser.add_argument(
        "--receipts-backend",
        action="append",
        choices=receipts.BACKENDS,
        help="repeat; default: file, smtp and off (the deliverer off)",
    )
    parser.add_argument(
        "--drain-limit",
        type=float,
        default=600,
        help="longest wait for the project's receipt outbox to empty after a measurement",
    )
    parser.add_argument(
        "--pending-pool",
        type=int,
        help="pending purchases seeded for the fulfil plans (default: at least 41,000, and "
        f"{POOL_RATE:,.0f}/s for every round of the project and the hand-written server)",
    )
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--server-cpus", default="0", help="CPUs of the server under test")
    parser.add_argument("--load-cpus", default="1", help="CPUs of wrk and this harness")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("RPC_SERVER_TEST_DATABASE_URL") or DEFAULT_POSTGRES,
        help="a PostgreSQL server where databases may be created (one per run, dropped after)",
    )
    parser.add_argument("--small-user", type=int, default=10_000, help="the 10k user's purchases")
    parser.add_argument("--big-user", type=int, default=1_000_000, help="the 1M user's purchases")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=10,
        help="the baselines' PostgreSQL connections (and same-work's SQLite ones)",
    )
    parser.add_argument(
        "--project-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra RPC_SERVER_* settings for the project (e.g. RPC_SERVER_LOG_LEVEL=WARNING)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"the Markdown report (default: {DEFAULT_OUTPUT.relative_to(REPO)} for a full run "
        f"of every workload on both engines, else {PARTIAL_OUTPUT})",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement as JSON here")
    parser.add_argument(
        "--from-json", type=Path, metavar="JSON", help="only render the report of a saved --json"
    )
    parser.add_argument("--no-round-trips", action="store_true", help="skip counting them")
    parser.add_argument("--round-trip-calls", type=int, default=50)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="instead of measuring: profile the project with pyinstrument for each selected "
        "workload (--duration seconds each) and write DIR/<engine>-<workload>.{html,txt,flat.txt}",
    )
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and databases")
    parser.add_argument("--seed", type=int, default=20261127, help="random seed of the plans")
    return parser.parse_args(argv)


def cpu_set(text: str) -> set[int] | None:
    available = os.sched_getaffinity(0)
    wanted = {int(part) for part in text.split(",") if part.strip()}
    if len(available) < 2 or not wanted <= available:
        return None  # too few CPUs to separate server and load: do not pin
    return wanted


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def log(message: str) -> None:
    print(message, flush=True)


def normalized(answer: Any, volatile: bool) -> Any:
    """An answer with what legitimately differs between two runs taken out."""
    if isinstance(answer, list):
        return [normalized(a, volatile) for a in answer]
    if isinstance(answer, dict):
        return {
            k: "…" if volatile and k in VOLATILE else normalized(v, volatile)
            for k, v in answer.items()
        }
    return answer


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.server_cpus = cpu_set(args.server_cpus)
        self.load_cpus = cpu_set(args.load_cpus)
        self.rng = random.Random(args.seed)
        self.measurements: list[Measurement] = []
        self.receipts: list[ReceiptsRun] = []
        self.round_trips: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.datasets: dict[str, dict[str, Any]] = {}
        self.rates: dict[tuple[str, str, str, str], float] = {}
        self.durations: dict[tuple[str, str, str, str], float] = {}
        self.project_env = dict(item.split("=", 1) for item in args.project_env)
        self.selected = [WORKLOADS[n] for n in (args.workload or list(WORKLOADS))]
        self.engines = ENGINES if args.engine == "both" else (args.engine,)

    # --- one engine --------------------------------------------------------------------

    async def engine_session(self, engine: str, with_trivial: bool) -> None:
        directory = self.workdir / engine
        directory.mkdir(parents=True, exist_ok=True)
        admin = self.args.postgres_url if engine == "postgresql" else None
        log(f"[{engine}] creating and seeding the database …")
        url = await seed.create_database(engine, directory, admin)
        try:
            await self.engine_runs(engine, url, with_trivial, directory)
        finally:
            if not self.args.keep:
                await seed.drop_database(url, admin)

    def pending_pool(self) -> int:
        if self.args.pending_pool is not None:
            return int(self.args.pending_pool)
        if not any(w.name == "fulfill" for w in self.selected):
            return POOL_FLOOR
        seconds = max(float(self.args.duration), float(self.args.warmup)) + 1
        needed = POOL_RATE * seconds * int(self.args.rounds) * 2
        return max(POOL_FLOOR, math.ceil(needed))

    async def engine_runs(self, engine: str, url: str, with_trivial: bool, directory: Path) -> None:
        sizes = seed.Sizes(
            list_small=self.args.small_user,
            list_big=self.args.big_user,
            pending_pool=self.pending_pool(),
        )
        dataset = await seed.seed(engine, url, sizes, self.rng)
        self.datasets[engine] = {
            "sizes": dataclasses.asdict(sizes),
            "seconds": {k: round(v, 1) for k, v in dataset.seconds.items()},
        }
        log(f"[{engine}] seeded in {dataset.seconds['total']:.1f} s ({dataset.seconds})")
        workloads = [w for w in self.selected if w.uses_database or with_trivial]
        try:
            if self.args.profile is not None:
                await self.profile(engine, dataset, [w for w in workloads if w.baseline], directory)
            else:
                await self.measure_all(engine, dataset, workloads, directory)
                self.datasets[engine]["pending_topped_up"] = dataset.topped_up
                compared = any(w.uses_database and w.baseline for w in workloads)
                if not self.args.no_round_trips and compared:
                    log(f"[{engine}] counting database round trips per call …")
                    self.round_trips += await roundtrips.count(
                        dataset,
                        directory,
                        self.server_cpus,
                        self.args.pool_size,
                        self.project_env,
                        self.args.round_trip_calls,
                    )
        finally:
            await dataset.bulk.close()

    def baselines_of(self, workload: Workload) -> tuple[str, ...]:
        if self.args.headline_only:
            return (workload.baseline,) if workload.baseline else ()
        return workload.baselines

    def start_servers(
        self, dataset: seed.Dataset, workloads: Sequence[Workload], directory: Path
    ) -> dict[str, servers.ServerProcess]:
        started: dict[str, servers.ServerProcess] = {}
        wanted = {role for w in workloads for role in self.baselines_of(w)}
        url, cpus, pool_size = dataset.url, self.server_cpus, self.args.pool_size
        try:
            project = servers.project_server(url, directory, cpus, self.project_env)
            project.start()
            started["project"] = project
            for role in BASELINE_ROLES:
                if role not in wanted:
                    continue
                if role == "floor":
                    document = directory / "openrpc.json"
                    document.write_bytes(
                        urlopen_bytes(f"http://127.0.0.1:{project.port}/openrpc.json")
                    )
                    server = servers.floor_server(document, directory, cpus)
                elif role == "hand-written":
                    server = servers.handwritten_server(url, directory, cpus, pool_size)
                else:
                    server = servers.same_work_server(
                        url,
                        directory,
                        cpus,
                        pool_size,
                        coalesce_batch_reads=role == "same-work-coalesced",
                    )
                server.start()
                started[role] = server
        except BaseException:
            for server in started.values():
                server.stop()
            raise
        return started

    async def measure_all(
        self, engine: str, dataset: seed.Dataset, workloads: Sequence[Workload], directory: Path
    ) -> None:
        context = PlanContext(dataset, directory, self.rng)
        compared = [w for w in workloads if w.baseline]
        if compared:
            await self.measure_compared(engine, dataset, compared, directory, context)
        if any(w.name == "receipts" for w in workloads):
            await self.measure_receipts(engine, dataset, directory, context)

    async def measure_receipts(
        self, engine: str, dataset: seed.Dataset, directory: Path, context: PlanContext
    ) -> None:
        log(
            f"[{engine}] receipts: {receipts.WORKLOAD.description} "
            f"(load average {load_average():.2f})"
        )
        options = receipts.Options(
            duration=self.args.receipts_duration,
            warmup=self.args.warmup,
            rounds=self.args.receipts_rounds,
            backends=tuple(self.args.receipts_backend or receipts.BACKENDS),
            connections=self.args.connections,
            threads=self.args.threads,
            server_cpus=self.server_cpus,
            load_cpus=self.load_cpus,
            project_env=self.project_env,
            drain_limit=self.args.drain_limit,
        )
        self.receipts += await receipts.measure(
            engine,
            dataset,
            context,
            directory,
            options,
            known_rate=self.rates.get((engine, "fulfill", "", "project")),
            log=log,
            notes=self.notes,
        )

    async def measure_compared(
        self,
        engine: str,
        dataset: seed.Dataset,
        workloads: Sequence[Workload],
        directory: Path,
        context: PlanContext,
    ) -> None:
        running = self.start_servers(dataset, workloads, directory)
        try:
            for workload in workloads:
                label_engine = engine if workload.uses_database else "none"
                log(
                    f"[{label_engine}] {workload.name}: {workload.description} "
                    f"(load average {load_average():.2f})"
                )
                roles = ("project", *self.baselines_of(workload))
                for variant in workload.variants:
                    await self.check_answers(
                        context, workload, variant, running, roles, label_engine
                    )
                    for role in roles:
                        await self.measure(
                            context,
                            workload,
                            variant,
                            running[role],
                            label_engine,
                            0,
                            self.args.warmup,
                        )
                for round_ in range(1, self.args.rounds + 1):
                    for variant in workload.variants:
                        for role in roles:
                            key = (label_engine, workload.name, variant, role)
                            await self.measure(
                                context,
                                workload,
                                variant,
                                running[role],
                                label_engine,
                                round_,
                                self.durations.get(key, self.args.duration),
                            )
        finally:
            for server in running.values():
                server.stop()

    async def measure(
        self,
        context: PlanContext,
        workload: Workload,
        variant: str,
        server: servers.ServerProcess,
        engine: str,
        round_: int,
        seconds: float,
    ) -> None:
        key = (engine, workload.name, variant, server.role)
        fresh = 0
        if workload.consumes:
            rate = self.rates.get(key, FIRST_GUESS_RPS)
            share = 1.0 if workload.name == "fulfill" else 0.05  # mixed: only a fallback
            fresh = math.ceil(rate * share * (seconds + 1) * 2) + 100
        label = f"{engine}-{workload.name}{variant}-{server.role}-r{round_}"
        script, plan = await build_plan(context, workload, variant, label=label, fresh_count=fresh)
        planned = context.last_pending if workload.name == "fulfill" else []
        if not server.alive():
            raise RuntimeError(f"{server.role} server died:\n{server.log_tail()}")
        started_load = load_average()
        server.reset_peak()
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), server.rss_kib()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        sampler = asyncio.create_task(sample())
        cpu_before = server.cpu_seconds()
        try:
            result = await loadgen.run_wrk(
                server.url,
                script=script,
                plan=plan,
                result=plan.with_suffix(".json"),
                seconds=seconds,
                connections=self.args.connections,
                threads=self.args.threads,
                cpus=self.load_cpus,
            )
        finally:
            stop.set()
            await sampler
        if not server.alive():
            raise RuntimeError(f"{server.role} server died:\n{server.log_tail()}")
        cpu_seconds = server.cpu_seconds() - cpu_before
        calls = result.requests * workload.calls_per_request
        peak = server.peak_rss_kib()
        backlog, outbox_drain = 0, 0.0
        # With its deliverer off (--project-env RPC_SERVER_MAIL_IN_SERVE=false) nothing
        # sends the receipts: there is no backlog to wait for.
        delivering = self.project_env.get("RPC_SERVER_MAIL_IN_SERVE", "true").lower() not in (
            "0",
            "false",
            "no",
        )
        drains = server.role == "project" and context.dataset is not None and delivering
        if drains:
            # The receipts the load queued are the project's work too: let them go out.
            backlog, outbox_drain = await receipts.wait_outbox_drained(
                context.dataset.bulk, self.args.drain_limit
            )
        drained = await server.wait_idle()
        if drains:
            # Requests wrk dropped in flight commit (and queue receipts) after the load.
            _late, late_seconds = await receipts.wait_outbox_drained(
                context.dataset.bulk, self.args.drain_limit
            )
            drained += late_seconds
        if planned and self.args.threads == 1 and context.dataset is not None:
            # Ids past those wrk can have sent (one in flight per connection) are unused.
            unused = planned[result.requests + 2 * self.args.connections + 100 :]
            seed.give_back(context.dataset, unused)
        self.rates[key] = result.rps
        if round_ == 0:
            self.durations[key] = self.measurement_seconds(result)
        measurement = Measurement(
            engine=engine,
            workload=workload.name,
            variant=variant,
            role=server.role,
            round=round_,
            seconds=result.seconds,
            requests=result.requests,
            rps=result.rps,
            calls_per_second=result.rps * workload.calls_per_request,
            p50_ms=result.p50_ms,
            p90_ms=result.p90_ms,
            p99_ms=result.p99_ms,
            mean_ms=result.mean_ms,
            peak_rss_mib=peak / 1024,
            rss_start_mib=window_median(samples, first=True) / 1024,
            rss_end_mib=window_median(samples, first=False) / 1024,
            socket_errors=result.socket_errors,
            http_errors=result.http_errors,
            rpc_errors=result.rpc_errors,
            exhausted=result.exhausted,
            fallbacks=result.fallbacks,
            load_average=started_load,
            cpu_us_per_call=cpu_seconds * 1e6 / calls if calls else float("nan"),
            idle_wait_s=drained,
            outbox_backlog=backlog,
            outbox_drain_s=outbox_drain,
        )
        self.measurements.append(measurement)
        what = "warm-up" if round_ == 0 else f"round {round_}"
        problems = ""
        if measurement.errors or result.exhausted:
            problems = (
                f"  errors: socket {result.socket_errors} http {result.http_errors} "
                f"rpc {result.rpc_errors}, exhausted {result.exhausted}"
            )
            self.notes.append(
                f"{engine} {workload.name} {variant} {server.role} {what}:{problems.strip()}"
            )
        log(
            f"  {what:>8} {variant:>3} {server.role:>9}: {result.seconds:5.1f} s "
            f"{result.rps:9,.0f} req/s  "
            f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
            f"CPU {measurement.cpu_us_per_call:6.0f} µs/call  "
            f"peak RSS {peak / 1024:6.1f} MiB  drained {drained:4.1f} s"
            + (f"  receipts to send {backlog:,}, sent in {outbox_drain:.1f} s" if backlog else "")
            + problems
        )

    def measurement_seconds(self, warmup: loadgen.LoadResult) -> float:
        """At least ``--duration``, and 10 times the warm-up's median latency (a closed loop
        drops the requests in flight at the end: with batches that take seconds, a short
        measurement would undercount), at most ``--max-duration``."""
        if warmup.requests >= self.args.connections:
            latency = warmup.p50_ms / 1000
        else:  # most connections never finished a request during the warm-up
            latency = 2 * max(warmup.seconds, self.args.warmup)
        shortest: float = self.args.duration
        longest = max(float(self.args.max_duration), shortest)
        return min(max(shortest, 10 * latency), longest)

    async def check_answers(
        self,
        context: PlanContext,
        workload: Workload,
        variant: str,
        running: dict[str, servers.ServerProcess],
        roles: Sequence[str],
        engine: str,
    ) -> None:
        """Every server must answer the workload's first request as the project does (and
        without error); for the workloads that fulfil, a purchase.create too."""
        answers: dict[str, Any] = {}
        if workload.name != "mixed":  # its calls are get, list, fulfill and create
            _script, plan = await build_plan(
                context,
                workload,
                variant,
                label=f"check-{engine}-{workload.name}{variant}",
                fresh_count=len(roles),
            )
            requests = list(sample_requests(plan, len(roles)))
            for index, role in enumerate(roles):
                authorization, body = requests[index if workload.consumes else 0]
                answers[role] = roundtrips.post(running[role].url, authorization, body)
        creates: dict[str, Any] = {}
        if workload.consumes and context.dataset is not None:
            # purchase.create, as the mixed workload sends it (of a course the buyer has not).
            buyer = context.dataset.mixed_users[0]
            [course] = await seed.fresh_courses(context.dataset, 1)
            tag = f"{workload.name}{variant}-{self.rng.randrange(10**9)}"
            for role in roles:
                params = {"course": course, "idempotency_key": f"check-{role}-{tag}"}
                body = rpc("purchase.create", params, 1)
                creates[role] = roundtrips.post(running[role].url, buyer.authorization, body)
        problems = []
        for kind, answered, volatile in (
            ("", answers, workload.consumes),
            ("purchase.create: ", creates, True),
        ):
            for role, answer in answered.items():
                items = answer if isinstance(answer, list) else [answer]
                if any("error" in item for item in items):
                    problems.append(f"{kind}{role} answered an error: {json.dumps(answer)[:300]}")
                project = answered["project"]
                if role != "project" and normalized(project, volatile) != normalized(
                    answer, volatile
                ):
                    problems.append(
                        f"{kind}{role}'s answer differs from the project's:\n"
                        f"  project:  {json.dumps(project)[:400]}\n"
                        f"  {role}: {json.dumps(answer)[:400]}"
                    )
        for problem in problems:
            log(f"  CHECK {engine} {workload.name} {variant}: {problem}")
            self.notes.append(f"check {engine} {workload.name} {variant}: {problem}")
        if not problems:
            checked = [f"{len(answered)} servers" for answered in (answers, creates) if answered]
            log(f"  check {workload.name} {variant}: same answers ({', '.join(checked)})")

    # --- profiles ----------------------------------------------------------------------

    async def profile(
        self, engine: str, dataset: seed.Dataset, workloads: Sequence[Workload], directory: Path
    ) -> None:
        out_dir: Path = self.args.profile
        context = PlanContext(dataset, directory, self.rng)
        for workload in workloads:
            for variant in workload.variants:
                name = f"{engine if workload.uses_database else 'nodb'}-{workload.name}{variant}"
                prefix = out_dir / name
                server = servers.project_server(
                    dataset.url,
                    directory,
                    self.server_cpus,
                    self.project_env,
                    instrument=["--profile-to", str(prefix)],
                    name=f"profile-{name}",
                )
                server.start()
                try:
                    await self.measure(
                        context, workload, variant, server, engine, 0, self.args.warmup
                    )
                    servers.remove(Path(f"{prefix}.txt"))
                    server.signal(signal.SIGUSR2)
                    await self.measure(
                        context, workload, variant, server, engine, 1, self.args.duration
                    )
                    server.signal(signal.SIGUSR2)
                    await servers.wait_for_file(Path(f"{prefix}.txt"), within=120)
                finally:
                    server.stop()
                log(f"  profile written: {prefix}.html, {prefix}.txt, {prefix}.flat.txt")
                log(head(Path(f"{prefix}.flat.txt"), 25))

    # --- the whole run -----------------------------------------------------------------

    async def run(self) -> None:
        with_trivial = True
        for engine in self.engines:
            await self.engine_session(engine, with_trivial)
            with_trivial = False


def window_median(samples: Sequence[tuple[float, int]], *, first: bool) -> float:
    """The median RSS over the first (or last) tenth of a measurement."""
    if not samples:
        return float("nan")
    start, end = samples[0][0], samples[-1][0]
    tenth = max((end - start) / 10, 0.5)
    chosen = [rss for t, rss in samples if (t <= start + tenth if first else t >= end - tenth)]
    return float(sorted(chosen)[len(chosen) // 2])


def head(path: Path, lines: int) -> str:
    return "\n".join("    " + line for line in path.read_text().splitlines()[:lines])


def urlopen_bytes(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def machine_facts() -> dict[str, Any]:
    def run(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, cwd=REPO).stdout
        except OSError:
            return ""

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in (
        "aiohttp",
        "jsonrpcserver",
        "SQLAlchemy",
        "aiosqlite",
        "asyncpg",
        "marshmallow",
        "orjson",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    wrk_version = run("wrk", "--version").splitlines()[:1]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": run("git", "rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no").strip()),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": versions,
        "wrk": wrk_version[0].split("Copyright")[0].strip() if wrk_version else "",
    }


def record(bench: Bench, facts: dict[str, Any], started_load: float) -> dict[str, Any]:
    """Everything the report is made of, as JSON-ready data (``--json``, ``--from-json``)."""
    args = bench.args
    pinning = (
        f"server CPUs {sorted(bench.server_cpus)}, wrk and harness CPUs {sorted(bench.load_cpus)}"
        if bench.server_cpus and bench.load_cpus
        else "not pinned (fewer than 2 CPUs)"
    )
    return {
        "command": " ".join(sys.argv[1:]),
        "facts": facts,
        "conditions": {
            "pinning": pinning,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "duration": args.duration,
            "max_duration": args.max_duration,
            "warmup": args.warmup,
            "project_env": args.project_env,
            "pool_size": args.pool_size,
            "headline_only": args.headline_only,
            "receipts_duration": args.receipts_duration,
            "receipts_rounds": args.receipts_rounds,
            "drain_limit": args.drain_limit,
        },
        "load_average": {"start": started_load, "end": load_average()},
        "datasets": bench.datasets,
        "measurements": [dataclasses.asdict(m) for m in bench.measurements],
        "receipts": [dataclasses.asdict(r) for r in bench.receipts],
        "round_trips": bench.round_trips,
        "notes": bench.notes,
    }


def render(data: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    facts, conditions = data["facts"], data["conditions"]
    measurements = [Measurement(**m) for m in data["measurements"]]
    receipt_runs = [
        ReceiptsRun(**{**r, "timeline": [tuple(t) for t in r.get("timeline", [])]})
        for r in data.get("receipts", [])
    ]
    rows = report.rows_of(measurements)
    goals = report.targets(rows, conditions["duration"], receipt_runs)
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    project_env = conditions["project_env"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `.venv/bin/python -m tests.benchmarks.run` "
        f"(`{data['command'] or 'no options'}`); how to read it: [README.md](README.md).",
        "",
        f"- Run: {facts['date']}, commit `{facts['commit']}`"
        + (" with uncommitted changes" if facts["dirty"] else "")
        + f"; {facts['cpus']} {report.TIMES} {facts['cpu_model']}; "
        f"Python {facts['python']}; {versions}; {facts['wrk']}.",
        f"- Conditions: one server process each, {conditions['pinning']}; loopback; "
        f"{conditions['connections']} keep-alive connections, {conditions['threads']} wrk "
        f"thread(s); {conditions['rounds']} interleaved rounds (project, then its baselines) "
        f"of at least {conditions['duration']:g} s (stretched to 10{report.TIMES} the "
        "warm-up's median latency, at most "
        f"{max(conditions['max_duration'], conditions['duration']):g} s) after "
        f"{conditions['warmup']:g} s of warm-up per server and workload; each server is "
        "left to finish its queued work before the next measurement (the project: until "
        "its receipt outbox is empty, then idle).",
        f"- Load average (1 min) at the start: {data['load_average']['start']:.2f}; at the "
        f"end: {data['load_average']['end']:.2f} (per measurement: the JSON file). The "
        "machine is shared: other test runs may have been running at the same time, and "
        "PostgreSQL's own processes are not pinned.",
        "- The project runs as `rpc-server serve` with its defaults on: rate limits on at "
        "limits the load does not reach (`RPC_SERVER_RATE_LIMIT=100000`, "
        "`RPC_SERVER_ANONYMOUS_RATE_LIMIT=10000000`), the receipt deliverer running in "
        "serve (file mailer), INFO logging (one access-log line per request)"
        + (f", and {', '.join(project_env)}" if project_env else "")
        + ". The headline baseline of the database workloads is the hand-written server "
        f"(h); the baselines keep {conditions['pool_size']} PostgreSQL connections (h: one "
        "read and one write connection on SQLite). The baselines queue their receipts due "
        "in 2100: the project's deliverer never sends them.",
    ]
    for engine, dataset in data["datasets"].items():
        sizes = dataset["sizes"]
        topped = dataset.get("pending_topped_up", 0)
        lines.append(
            f"- {report.engine_label(engine)} data: users with {sizes['get_user']:,} (get), "
            f"{sizes['list_small']:,} and {sizes['list_big']:,} (list), "
            f"{sizes['mixed_users']} {report.TIMES} {sizes['mixed_user_purchases']} (mixed) "
            f"purchases, then {sizes.get('newer_by_others', 0):,} newer ones of another user, "
            f"then {sizes.get('pending_pool', 0):,} pending ones to fulfil"
            + (f" (topped up with {topped:,} more during the run)" if topped else "")
            + f"; seeded in {dataset['seconds'].get('total', 0):.0f} s."
        )
    lines.append("")
    if rows:
        lines += [
            "## Throughput, latency, memory",
            "",
            "Against the headline baseline: the hand-written server (h) for the database "
            "workloads, the floor (a) for the trivial ones.",
            "",
            report.results_table(rows),
            "",
        ]
    extras = report.extras_table(rows)
    if extras:
        lines += [
            "## Against the other baselines (secondary)",
            "",
            "The same measurements of the project, against same-work (b) (the project's "
            "statements by hand, batch items concurrent on a pool) and, for batches, (b) "
            "reading a batch's purchases with one statement.",
            "",
            extras,
            "",
        ]
    outbox = report.outbox_table(rows)
    if outbox:
        lines += [
            "## The project's receipts after each measurement",
            "",
            "Receipts queued by the load and not yet sent when it stopped, and how long the "
            "deliverer in serve took to send them (the next measurement waits for it).",
            "",
            outbox,
            "",
        ]
    receipts_text = report.receipts_table(receipt_runs)
    if receipts_text:
        lines += [
            "## Receipts: does the deliverer keep up?",
            "",
            "The project alone, `purchase.fulfill` at saturation for "
            f"{conditions.get('receipts_duration', 60):g} s per measurement, with its "
            "deliverer on (file mailer; SMTP to a local aiosmtpd sink) and off "
            "(`RPC_SERVER_MAIL_IN_SERVE=false`). See [receipts.py](receipts.py).",
            "",
            receipts_text,
            "",
        ]
    size = report.size_table(rows)
    if size:
        lines += ["## List pages: 1M-purchase user against 10k", "", size, ""]
    lines += ["## Targets", "", report.targets_table(goals), ""]
    trips = report.round_trips_table(data["round_trips"])
    if trips:
        lines += [
            "## Database round trips per call",
            "",
            "Counted on instrumented servers (`--count-to`), sequential calls after a "
            "warm-up. A driver round trip is one wait for the database: one hop to "
            "aiosqlite's thread, or one message batch written to PostgreSQL. The "
            "baselines' statements are their round trips (one driver call each).",
            "",
            trips,
            "",
        ]
    if data["notes"]:
        lines += ["## Notes from this run", ""] + [f"- {note}" for note in data["notes"]] + [""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    if args.from_json is not None:
        output = args.output or PARTIAL_OUTPUT
        write_report(output, render(json.loads(args.from_json.read_text())))
        log(f"report written to {output}")
        return 0
    loadgen.wrk_path()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rpc-bench-"))
    os.makedirs(workdir, exist_ok=True)
    if args.profile is not None:
        os.makedirs(args.profile, exist_ok=True)
    bench = Bench(args, workdir)
    if bench.load_cpus:
        os.sched_setaffinity(0, bench.load_cpus)  # the harness stays off the server's CPU
    started_load = load_average()
    facts = machine_facts()
    log(f"work directory {workdir}; load average {started_load:.2f}")
    try:
        await bench.run()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.profile is not None:
        return 0
    full_run = args.workload is None and args.engine == "both"
    output = args.output or (DEFAULT_OUTPUT if full_run else PARTIAL_OUTPUT)
    data = record(bench, facts, started_load)
    if args.json:
        write_report(args.json, json.dumps(data, indent=1) + "\n")
    text = render(data)
    write_report(output, text)
    log("\n" + text)
    log(f"\nreport written to {output}")
    return 0


def write_report(path: Path, text: str) -> None:
    """Write a report, making its directory if need be: a run's results (many minutes
    of measurements) are never lost to a folder not made yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
