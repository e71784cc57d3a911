"""Benchmarks: the project against bare-aiohttp baselines, interleaved, in one run.

    .venv/bin/python -m tests.benchmarks.run [--engine sqlite|postgresql|both] [--rounds 3]
        [--duration 5] [--workload NAME ...] [--output PATH] [--profile DIR]

For each engine: a fresh database is created and seeded; the project (``rpc-server
serve``), the floor and the same-work baseline start in their own processes pinned to
``--server-cpus``; wrk runs pinned to ``--load-cpus`` with ``--connections`` keep-alive
connections. Each workload is checked (both servers give the same answers), warmed up,
then measured round after round, the project and its baseline back to back. Then the
round trips per call are counted on instrumented servers. The report goes to
``--output`` (Markdown) and stdout. See README.md in this folder.
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

from tests.benchmarks import loadgen, report, roundtrips, seed, servers
from tests.benchmarks.report import Measurement
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
        "--pool-size", type=int, default=10, help="the same-work baseline's connections"
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

    async def engine_runs(self, engine: str, url: str, with_trivial: bool, directory: Path) -> None:
        sizes = seed.Sizes(list_small=self.args.small_user, list_big=self.args.big_user)
        dataset = await seed.seed(engine, url, sizes, self.rng)
        self.datasets[engine] = {
            "sizes": dataclasses.asdict(sizes),
            "seconds": {k: round(v, 1) for k, v in dataset.seconds.items()},
        }
        log(f"[{engine}] seeded in {dataset.seconds['total']:.1f} s ({dataset.seconds})")
        workloads = [w for w in self.selected if w.uses_database or with_trivial]
        try:
            if self.args.profile is not None:
                await self.profile(engine, dataset, workloads, directory)
            else:
                await self.measure_all(engine, dataset, workloads, directory)
                if not self.args.no_round_trips and any(w.uses_database for w in workloads):
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

    def start_servers(
        self, dataset: seed.Dataset, workloads: Sequence[Workload], directory: Path
    ) -> dict[str, servers.ServerProcess]:
        started: dict[str, servers.ServerProcess] = {}
        try:
            project = servers.project_server(
                dataset.url, directory, self.server_cpus, self.project_env
            )
            project.start()
            started["project"] = project
            if any(w.baseline == "floor" for w in workloads):
                document = directory / "openrpc.json"
                document.write_bytes(urlopen_bytes(f"http://127.0.0.1:{project.port}/openrpc.json"))
                floor = servers.floor_server(document, directory, self.server_cpus)
                floor.start()
                started["floor"] = floor
            if any(w.baseline == "same-work" for w in workloads):
                same = servers.same_work_server(
                    dataset.url, directory, self.server_cpus, self.args.pool_size
                )
                same.start()
                started["same-work"] = same
            if any(w.baseline == "same-work-coalesced" for w in workloads):
                coalescing = servers.same_work_server(
                    dataset.url,
                    directory,
                    self.server_cpus,
                    self.args.pool_size,
                    coalesce_batch_reads=True,
                )
                coalescing.start()
                started["same-work-coalesced"] = coalescing
        except BaseException:
            for server in started.values():
                server.stop()
            raise
        return started

    async def measure_all(
        self, engine: str, dataset: seed.Dataset, workloads: Sequence[Workload], directory: Path
    ) -> None:
        running = self.start_servers(dataset, workloads, directory)
        context = PlanContext(dataset, directory, self.rng)
        try:
            for workload in workloads:
                label_engine = engine if workload.uses_database else "none"
                log(
                    f"[{label_engine}] {workload.name}: {workload.description} "
                    f"(load average {load_average():.2f})"
                )
                roles = ("project", workload.baseline)
                for variant in workload.variants:
                    await self.check_answers(context, workload, variant, running, label_engine)
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
        drained = await server.wait_idle()
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
            f"peak RSS {peak / 1024:6.1f} MiB  drained {drained:4.1f} s{problems}"
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
        engine: str,
    ) -> None:
        """Both servers must answer the workload's first request alike (and without error)."""
        if workload.name == "mixed":
            return  # its calls are those of get, list, fulfill, and create (checked below)
        _script, plan = await build_plan(
            context,
            workload,
            variant,
            label=f"check-{engine}-{workload.name}{variant}",
            fresh_count=2,
        )
        requests = list(sample_requests(plan, 2))
        answers = {}
        for index, role in enumerate(("project", workload.baseline)):
            authorization, body = requests[index if workload.consumes else 0]
            answers[role] = roundtrips.post(running[role].url, authorization, body)
        if workload.name == "fulfill" and context.dataset is not None:
            # purchase.create too, for the mixed workload (of a course the buyer has not).
            buyer = context.dataset.mixed_users[0]
            [course] = await seed.fresh_courses(context.dataset, 1)
            for role in ("project", "same-work"):
                params = {"course": course, "idempotency_key": f"check-{role}"}
                body = rpc("purchase.create", params, 1)
                answers[f"{role} create"] = roundtrips.post(
                    running[role].url, buyer.authorization, body
                )
        volatile = workload.consumes
        project, baseline = answers["project"], answers[workload.baseline]
        problems = []
        for name, answer in answers.items():
            items = answer if isinstance(answer, list) else [answer]
            if any("error" in item for item in items):
                problems.append(f"{name} answered an error: {json.dumps(answer)[:300]}")
        if normalized(project, volatile) != normalized(baseline, volatile):
            problems.append(
                f"answers differ:\n  project:  {json.dumps(project)[:400]}\n"
                f"  baseline: {json.dumps(baseline)[:400]}"
            )
        if "project create" in answers and normalized(answers["project create"], True) != (
            normalized(answers["same-work create"], True)
        ):
            problems.append("purchase.create answers differ")
        for problem in problems:
            log(f"  CHECK {engine} {workload.name} {variant}: {problem}")
            self.notes.append(f"check {engine} {workload.name} {variant}: {problem}")

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
        },
        "load_average": {"start": started_load, "end": load_average()},
        "datasets": bench.datasets,
        "measurements": [dataclasses.asdict(m) for m in bench.measurements],
        "round_trips": bench.round_trips,
        "notes": bench.notes,
    }


def render(data: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    facts, conditions = data["facts"], data["conditions"]
    measurements = [Measurement(**m) for m in data["measurements"]]
    rows = report.rows_of(measurements)
    goals = report.targets(rows, conditions["duration"])
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
        f"thread(s); {conditions['rounds']} interleaved rounds (project, then its baseline) of "
        f"at least {conditions['duration']:g} s (stretched to 10{report.TIMES} the warm-up's "
        f"median latency, at most {max(conditions['max_duration'], conditions['duration']):g} s) "
        "after "
        f"{conditions['warmup']:g} s of warm-up per server and workload; each server is "
        "left to finish its queued work before the next measurement.",
        f"- Load average (1 min) at the start: {data['load_average']['start']:.2f}; at the "
        f"end: {data['load_average']['end']:.2f} (per measurement: the JSON file). The "
        "machine is shared: other test runs may have been running at the same time, and "
        "PostgreSQL's own processes are not pinned.",
        "- The project runs as `rpc-server serve` with its rate limits on at limits the load "
        "does not reach (`RPC_SERVER_RATE_LIMIT=100000`, `RPC_SERVER_ANONYMOUS_RATE_LIMIT="
        "10000000`) and `RPC_SERVER_MAIL_IN_SERVE=false`"
        + (f" and {', '.join(project_env)}" if project_env else "")
        + "; everything else default (INFO logging: one access-log line per request). "
        f"The same-work baseline keeps {conditions['pool_size']} connections.",
    ]
    for engine, dataset in data["datasets"].items():
        sizes = dataset["sizes"]
        lines.append(
            f"- {report.engine_label(engine)} data: users with {sizes['get_user']:,} (get), "
            f"{sizes['list_small']:,} and {sizes['list_big']:,} (list), "
            f"{sizes['mixed_users']} {report.TIMES} {sizes['mixed_user_purchases']} (mixed) "
            f"purchases, then {sizes.get('newer_by_others', 0):,} newer ones of another user; "
            f"seeded in {dataset['seconds'].get('total', 0):.0f} s."
        )
    lines += ["", "## Throughput, latency, memory", "", report.results_table(rows), ""]
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
            "baseline's statements are its round trips (one driver call each).",
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
        output.write_text(render(json.loads(args.from_json.read_text())))
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
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    text = render(data)
    output.write_text(text)
    log("\n" + text)
    log(f"\nreport written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
