"""Benchmark: what metrics and tracing cost (issue 19), the three settings in one run.

    .venv/bin/python -m tests.benchmarks.observability [--engine sqlite|postgresql|both]
        [--rounds 5] [--duration 5] [--output PATH]

Three ``rpc-server serve`` processes run side by side on a fresh, seeded database, each
with the project's defaults (``servers.project_env``: rate limiter on at limits the load
never reaches, receipt deliverer running, INFO access log), differing only in:

- **metrics-on**: the default (``RPC_SERVER_METRICS`` unset);
- **metrics-off**: ``RPC_SERVER_METRICS=false``;
- **tracing**: ``RPC_SERVER_TRACING=true`` (metrics on, as by default), exporting with
  OTLP/HTTP to a sink in this harness (``SpanSink``: it accepts ``POST /v1/traces``,
  counts the spans and answers 200, so the export really happens), with OpenTelemetry's
  default sampler (always on) and batch span processor.

For ``purchase.get`` single and a batch of 50 (run.py's ``get`` and ``get-batch``
workloads and plans), every server is warmed up, then measured round after round, the
order of the three rotating each round so that none is always first. The ratios are per
round (metrics-on ÷ metrics-off, tracing ÷ metrics-off, tracing ÷ metrics-on, in req/s
and in server CPU per call), then the median over rounds. The issue's goal: metrics on
cost at most 5% of throughput (on/off ≥ 0.95). Load generation, pinning, idle waits and
the measurement record are run.py's (``Bench.measure``); the report goes to
``--output`` (default: ``OBSERVABILITY_RESULTS.md`` here for a run of both engines).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import re
import shutil
import sys
import tempfile
import time
import timeit
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.benchmarks import report, run, seed, servers
from tests.benchmarks.report import Measurement, median
from tests.benchmarks.workloads import WORKLOADS, PlanContext, Workload
from tests.processes import free_port

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "OBSERVABILITY_RESULTS.md"
PARTIAL_OUTPUT = Path(tempfile.gettempdir()) / "rpc-bench-OBSERVABILITY_RESULTS.md"
MEASURED = (WORKLOADS["get"], WORKLOADS["get-batch"])
ON, OFF, TRACING = "metrics-on", "metrics-off", "tracing"
CONFIGS = (ON, OFF, TRACING)
METRICS_GOAL = 0.95  # metrics on: at most 5% of the throughput with them off
# The same goal in server CPU per call (on ÷ off): throughput at saturation is 1 ÷ CPU.
METRICS_CPU_GOAL = 1 / METRICS_GOAL
# Settings the three servers must not inherit from this shell: each one sets its own.
OWN_SETTINGS = ("RPC_SERVER_METRICS", "RPC_SERVER_TRACING", "OTEL_SDK_DISABLED")
COMMAND = ".venv/bin/python -m tests.benchmarks.observability"
CALLS_COUNTED = re.compile(r'^rpc_server_calls_total\{[^}]*method="purchase\.get"[^}]*\} (\S+)$')
CHECKOUTS_COUNTED = re.compile(r"^rpc_server_db_pool_wait_seconds_count (\S+)$")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.observability",
        description="The cost of metrics and tracing: purchase.get single and batch of 50 "
        "with metrics on (default), off, and tracing on, interleaved (see the module doc).",
    )
    parser.add_argument("--engine", choices=(*run.ENGINES, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three servers")
    parser.add_argument("--duration", type=float, default=5, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--server-cpus", default="0", help="CPUs of the servers under test")
    parser.add_argument("--load-cpus", default="1", help="CPUs of wrk, this harness, the sink")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("RPC_SERVER_TEST_DATABASE_URL") or run.DEFAULT_POSTGRES,
        help="a PostgreSQL server where a database may be created (dropped after the run)",
    )
    parser.add_argument(
        "--project-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra settings for all three servers (e.g. RPC_SERVER_LOG_LEVEL=WARNING)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"the Markdown report (default: {DEFAULT_OUTPUT.name} in this folder when both "
        f"engines run, else {PARTIAL_OUTPUT})",
    )
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and database")
    parser.add_argument("--seed", type=int, default=20261203, help="random seed of the plans")
    return parser.parse_args(argv)


def bench_args(args: argparse.Namespace, engine: str) -> argparse.Namespace:
    """run.py's options for ``Bench.measure`` (wrk, pinning, durations, drain limit)."""
    argv = ["--engine", engine, "--rounds", str(args.rounds), "--duration", str(args.duration)]
    argv += ["--warmup", str(args.warmup), "--connections", str(args.connections)]
    argv += ["--server-cpus", args.server_cpus, "--load-cpus", args.load_cpus]
    argv += ["--postgres-url", args.postgres_url, "--seed", str(args.seed)]
    for setting in args.project_env:
        argv += ["--project-env", setting]
    return run.parse_args(argv)


class SpanSink:
    """An OTLP/HTTP trace receiver in this process: counts exports and spans, answers 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.exports = 0
        self.spans = 0
        self.failures = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            export = ExportTraceServiceRequest.FromString(body)
        except Exception:  # a body that is not OTLP protobuf: the check below shows it
            self.failures += 1
            return web.Response(status=400)
        self.exports += 1
        self.spans += sum(
            len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans
        )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/traces", self.receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class EngineFacts:
    """What the run checked besides throughput, per engine."""

    metrics_status: dict[str, int] = field(default_factory=dict)  # GET /metrics status
    get_calls_counted: dict[str, float] = field(default_factory=dict)  # from /metrics
    # Pool checkouts per call on the metrics-on server, by workload (from /metrics).
    checkouts_per_call: dict[str, float] = field(default_factory=dict)
    calls_sent: dict[str, int] = field(default_factory=dict)  # wrk's, warm-ups included
    spans: int = 0
    exports: int = 0
    export_failures: int = 0
    expected_spans: int = 0  # a request span + one per call, of the tracing server's load


def scrape(server: servers.ServerProcess) -> tuple[int, float, float]:
    """GET /metrics: (status, purchase.get calls counted, pool checkouts counted)."""
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, 0.0, 0.0
    lines = text.splitlines()

    def total(pattern: re.Pattern[str]) -> float:
        return sum(float(match.group(1)) for line in lines if (match := pattern.match(line)))

    return status, total(CALLS_COUNTED), total(CHECKOUTS_COUNTED)


def server_env(config: str, sink: SpanSink, extra: dict[str, str]) -> dict[str, str]:
    env = dict(extra)
    if config == OFF:
        env["RPC_SERVER_METRICS"] = "false"
    elif config == TRACING:
        env["RPC_SERVER_TRACING"] = "true"
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
    return env


async def measure_engine(
    args: argparse.Namespace, engine: str, workdir: Path
) -> tuple[run.Bench, EngineFacts]:
    options = bench_args(args, engine)
    bench = run.Bench(options, workdir)
    directory = workdir / engine
    directory.mkdir(parents=True, exist_ok=True)
    admin = args.postgres_url if engine == "postgresql" else None
    run.log(f"[{engine}] creating and seeding the database …")
    url = await seed.create_database(engine, directory, admin)
    facts = EngineFacts()
    sink = SpanSink()
    await sink.start()
    try:
        # purchase.get needs the 10,000 purchases of its caller; the list users are not
        # measured here, so they stay small (run.py seeds a million for its lists).
        sizes = seed.Sizes(list_small=1_000, list_big=1_000, pending_pool=0)
        dataset = await seed.seed(engine, url, sizes, bench.rng)
        bench.datasets[engine] = {"seconds": {k: round(v, 1) for k, v in dataset.seconds.items()}}
        run.log(f"[{engine}] seeded in {dataset.seconds['total']:.1f} s")
        try:
            await measure_configs(bench, engine, dataset, directory, sink, facts)
        finally:
            await dataset.bulk.close()
    finally:
        await sink.stop()
        if not args.keep:
            await seed.drop_database(url, admin)
    return bench, facts


async def measure_configs(
    bench: run.Bench,
    engine: str,
    dataset: seed.Dataset,
    directory: Path,
    sink: SpanSink,
    facts: EngineFacts,
) -> None:
    context = PlanContext(dataset, directory, bench.rng)
    running: dict[str, servers.ServerProcess] = {}
    try:
        for config in CONFIGS:
            server = servers.project_server(
                dataset.url,
                directory,
                bench.server_cpus,
                server_env(config, sink, bench.project_env),
                name=config,
            )
            server.role = config
            server.start()
            running[config] = server
        for workload in MEASURED:
            _status, calls_before, checkouts_before = scrape(running[ON])
            await measure_workload(bench, engine, workload, context, running)
            _status, calls, checkouts = scrape(running[ON])
            if calls > calls_before:
                per_call = (checkouts - checkouts_before) / (calls - calls_before)
                facts.checkouts_per_call[workload.name] = per_call
        for config, server in running.items():
            status, counted, _checkouts = scrape(server)
            facts.metrics_status[config], facts.get_calls_counted[config] = status, counted
        # The tracing server's shutdown exports its last spans to the sink, which runs on
        # this event loop: the loop must stay free while the servers stop.
        for server in running.values():
            await asyncio.to_thread(server.stop)
    finally:
        for server in running.values():
            server.stop()
    for m in bench.measurements:
        calls = m.requests * WORKLOADS[m.workload].calls_per_request
        facts.calls_sent[m.role] = facts.calls_sent.get(m.role, 0) + calls
        if m.role == TRACING:
            facts.expected_spans += m.requests + calls
    facts.spans, facts.exports, facts.export_failures = sink.spans, sink.exports, sink.failures


async def measure_workload(
    bench: run.Bench,
    engine: str,
    workload: Workload,
    context: PlanContext,
    running: dict[str, servers.ServerProcess],
) -> None:
    run.log(f"[{engine}] {workload.name}: {workload.description} (load {run.load_average():.2f})")
    # run.py's answer check compares with the server under the key "project".
    checked = {"project": running[ON], OFF: running[OFF], TRACING: running[TRACING]}
    await bench.check_answers(context, workload, "", checked, tuple(checked), engine)
    for config in CONFIGS:
        await bench.measure(context, workload, "", running[config], engine, 0, bench.args.warmup)
    # One length for the three (run.py stretches a measurement of slow batches).
    keys = [(engine, workload.name, "", config) for config in CONFIGS]
    seconds = max(bench.durations.get(key, bench.args.duration) for key in keys)
    for round_ in range(1, bench.args.rounds + 1):
        shift = (round_ - 1) % len(CONFIGS)
        for config in CONFIGS[shift:] + CONFIGS[:shift]:
            await bench.measure(context, workload, "", running[config], engine, round_, seconds)


# --- the metrics' own work, in this process -------------------------------------------


def metrics_work_us(number: int = 20_000, repeat: int = 7) -> dict[str, float]:
    """CPU µs of each piece of what the metrics record on ``purchase.get``'s path, timed
    here on a ``Metrics`` of its own (the best of ``repeat``): per HTTP body, per batch,
    per call (the envelope's clock and ``observe_call``) and per pool checkout (the
    unit of work's clock, ``checked_out``, ``given_back``). A floor: what the server
    spends on them beside (cache misses under load, the extra wakeups) is not in it."""
    from rpc_server.observability.metrics import Metrics

    metrics = Metrics(["purchase.get"])
    clock = time.perf_counter

    def body() -> None:
        metrics.observe_request(websocket=False)

    def batch() -> None:
        metrics.observe_batch(50)

    def call() -> None:
        started = clock()
        metrics.observe_call(metrics.method_label("purchase.get"), "ok", clock() - started)

    def checkout() -> None:
        started = clock()
        metrics.checked_out(clock() - started)
        metrics.given_back()

    pieces = {"body": body, "batch": batch, "call": call, "checkout": checkout}
    return {
        name: min(timeit.repeat(piece, number=number, repeat=repeat, timer=time.process_time))
        * 1e6
        / number
        for name, piece in pieces.items()
    }


def metrics_us_per_call(work: dict[str, float], workload: Workload, checkouts: float) -> float:
    calls = workload.calls_per_request
    per_body = work["body"] + (work["batch"] if calls > 1 else 0.0)
    return per_body / calls + work["call"] + checkouts * work["checkout"]


# --- the report ------------------------------------------------------------------------


def by_round(measurements: Sequence[Measurement], role: str) -> dict[int, Measurement]:
    return {m.round: m for m in measurements if m.role == role and m.round > 0}


def ratios(measurements: Sequence[Measurement], top: str, bottom: str) -> list[float]:
    """Per round: ``top``'s req/s ÷ ``bottom``'s."""
    a, b = by_round(measurements, top), by_round(measurements, bottom)
    return [a[r].rps / b[r].rps for r in sorted(a) if r in b and b[r].rps]


def cpu_ratios(measurements: Sequence[Measurement], top: str, bottom: str) -> list[float]:
    """Per round: ``top``'s server CPU per call ÷ ``bottom``'s (above 1: ``top`` spends more)."""
    a, b = by_round(measurements, top), by_round(measurements, bottom)
    return [
        a[r].cpu_us_per_call / b[r].cpu_us_per_call
        for r in sorted(a)
        if r in b and b[r].cpu_us_per_call > 0
    ]


def _ratio_cell(values: Sequence[float], bold: bool = False) -> str:
    middle = f"{median(values):.3f}"
    per_round = ", ".join(f"{v:.3f}" for v in values)
    return f"{'**' + middle + '**' if bold else middle} ({per_round})"


def render(
    args: argparse.Namespace,
    command: str,
    benches: dict[str, tuple[run.Bench, EngineFacts]],
    started_load: float,
    work: dict[str, float],
) -> str:
    facts = run.machine_facts()
    lines = [
        "# Benchmark: the cost of metrics and tracing (issue 19)",
        "",
        "Made by [observability.py](observability.py): three `rpc-server serve` processes "
        "with the project's defaults (rate limiter on, receipt deliverer running, INFO "
        "access log), differing only in **metrics-on** (the default), **metrics-off** "
        "(`RPC_SERVER_METRICS=false`) and **tracing** (`RPC_SERVER_TRACING=true`, metrics "
        "on, OTLP/HTTP export to a sink in the harness that counts the spans; default "
        "sampler, always on), measured in rotating order round after round with wrk. "
        "Ratios are per round, then the median (per-round values in brackets).",
        "",
        f"Command: `{(COMMAND + ' ' + command).strip()}`",
        "",
        f"Date {facts['date']}, commit {facts['commit']}"
        + (" (with uncommitted changes)" if facts["dirty"] else "")
        + f", {facts['cpus']} CPUs ({facts['cpu_model']}), Python {facts['python']}, "
        f"{facts['wrk']}; servers pinned to CPU {args.server_cpus}, wrk, harness and span "
        f"sink to CPU {args.load_cpus}; {args.connections} connections, {args.rounds} rounds "
        f"of {args.duration:g} s (batches stretched as run.py does), {args.warmup:g} s "
        f"warm-up each; load average {started_load:.2f} at the start, "
        f"{run.load_average():.2f} at the end.",
        "",
        "## Summary",
        "",
        "| engine | workload | metrics on ÷ off, req/s | goal ≥ 0.95 | CPU per call: on ÷ off "
        f"| goal ≤ {METRICS_CPU_GOAL:.3f} | tracing ÷ off, req/s | tracing ÷ metrics on, req/s "
        "| CPU per call: tracing ÷ off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details: list[str] = []
    for engine, (bench, engine_facts) in benches.items():
        for workload in MEASURED:
            ms = [
                m
                for m in bench.measurements
                if m.workload == workload.name and m.engine == engine and m.round > 0
            ]
            on_off, cpu_on_off = ratios(ms, ON, OFF), cpu_ratios(ms, ON, OFF)
            met = median(on_off) >= METRICS_GOAL
            cpu_met = median(cpu_on_off) <= METRICS_CPU_GOAL
            lines.append(
                f"| {report.engine_label(engine)} | {workload.name} "
                f"| {_ratio_cell(on_off, bold=True)} | {'met' if met else '**not met**'} "
                f"| {_ratio_cell(cpu_on_off, bold=True)} "
                f"| {'met' if cpu_met else '**not met**'} "
                f"| {_ratio_cell(ratios(ms, TRACING, OFF))} "
                f"| {_ratio_cell(ratios(ms, TRACING, ON))} "
                f"| {_ratio_cell(cpu_ratios(ms, TRACING, OFF))} |"
            )
        details += engine_details(engine, bench, engine_facts)
    lines += [
        "",
        "CPU per call is the server process's CPU time (all threads, the span exporter's "
        "included) over the calls wrk counted: steadier than req/s on a shared machine.",
        "",
        *work_section(benches, work),
        *details,
    ]
    return "\n".join(lines) + "\n"


def work_section(
    benches: dict[str, tuple[run.Bench, EngineFacts]], work: dict[str, float]
) -> list[str]:
    pieces = ", ".join(f"{name} {us:.2f} µs" for name, us in work.items())
    lines = [
        "## The metrics' own work per call (in-process, no load)",
        "",
        "What the metrics record on `purchase.get`'s path, timed in the harness's process "
        f"(best of 7 {report.TIMES} 20,000, process CPU time): {pieces}. Per call: the "
        "body's share (and the batch's), the call, and the pool checkouts per call that the "
        "metrics-on server counted (`rpc_server_db_pool_wait_seconds_count` ÷ calls). "
        "Beside it, the metrics-off server's CPU per call from the measurements above: their "
        "quotient is what metrics add to a call's CPU, without the machine's noise (a floor: cache "
        "effects under load are not in it).",
        "",
        "| engine | workload | pool checkouts per call | metrics µs per call "
        "| metrics-off server CPU µs per call | metrics' share |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for engine, (bench, facts) in benches.items():
        for workload in MEASURED:
            checkouts = facts.checkouts_per_call.get(workload.name, float("nan"))
            own = metrics_us_per_call(work, workload, checkouts)
            off = median(
                m.cpu_us_per_call
                for m in bench.measurements
                if m.workload == workload.name and m.role == OFF and m.round > 0
            )
            lines.append(
                f"| {report.engine_label(engine)} | {workload.name} | {checkouts:.2f} "
                f"| {own:.2f} | {off:,.0f} | {own / off:.2%} |"
            )
    return [*lines, ""]


def engine_details(engine: str, bench: run.Bench, facts: EngineFacts) -> list[str]:
    lines = [
        f"## {report.engine_label(engine)}",
        "",
        "| workload | server | req/s (median) | calls/s | p50 / p99 ms | CPU µs per call "
        "| peak RSS MiB | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in MEASURED:
        for config in CONFIGS:
            ms = [
                m
                for m in bench.measurements
                if m.workload == workload.name and m.role == config and m.round > 0
            ]
            lines.append(
                f"| {workload.name} | {config} | {median(m.rps for m in ms):,.0f} "
                f"| {median(m.calls_per_second for m in ms):,.0f} "
                f"| {median(m.p50_ms for m in ms):.1f} / {median(m.p99_ms for m in ms):.1f} "
                f"| {median(m.cpu_us_per_call for m in ms):,.0f} "
                f"| {max(m.peak_rss_mib for m in ms):.0f} | {sum(m.errors for m in ms)} |"
            )
    counted = ", ".join(
        f"{config} {facts.metrics_status.get(config, '—')}"
        + (
            f" ({facts.get_calls_counted[config]:,.0f} purchase.get calls counted, "
            f"{facts.calls_sent.get(config, 0):,} answered to wrk)"
            if facts.metrics_status.get(config) == 200
            else ""
        )
        for config in CONFIGS
    )
    lines += [
        "",
        f"Checks: `GET /metrics` answered {counted}. The span sink received "
        f"{facts.spans:,} spans in {facts.exports:,} exports ({facts.export_failures} "
        f"unreadable) for {facts.expected_spans:,} expected (a request span and one per call "
        "of every request wrk counted on the tracing server, warm-ups included; spans of "
        "requests cut off at the end of a measurement and the answer checks come on top, "
        "and spans the SDK's batch processor drops when its queue is full are missing).",
        "",
    ]
    if bench.notes:
        lines += ["Notes:", "", *[f"- {note}" for note in bench.notes], ""]
    return lines


async def main_async(args: argparse.Namespace, command: str) -> int:
    for name in OWN_SETTINGS:
        if os.environ.pop(name, None) is not None:
            run.log(f"{name} is set in this shell: ignored, each server sets its own")
    engines = run.ENGINES if args.engine == "both" else (args.engine,)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rpc-bench-observability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_cpus = run.cpu_set(args.load_cpus)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the harness and the sink stay off the servers
    started_load = run.load_average()
    started = time.monotonic()
    run.log(f"work directory {workdir}; load average {started_load:.2f}")
    benches: dict[str, tuple[run.Bench, EngineFacts]] = {}
    try:
        for engine in engines:
            benches[engine] = await measure_engine(args, engine, workdir)
            run.log(f"[{engine}] done after {time.monotonic() - started:.0f} s")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    run.log("timing the metrics' own work in this process …")
    work = metrics_work_us()
    output = args.output or (DEFAULT_OUTPUT if args.engine == "both" else PARTIAL_OUTPUT)
    text = render(args, command, benches, started_load, work)
    output.write_text(text)
    run.log("\n" + text)
    run.log(f"report written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    return asyncio.run(main_async(parse_args(arguments), " ".join(arguments)))


if __name__ == "__main__":
    sys.exit(main())
