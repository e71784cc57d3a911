"""Turning measurements into medians, ratios, target verdicts and the Markdown report.

Ratios are per round: the project's requests per second divided by a baseline's in the
same round (measured back to back), then the median over the rounds. The headline
ratio is to the workload's baseline (the hand-written server (h) for the database
workloads, the floor (a) for the trivial ones); the extra baselines (same-work (b),
and (b) coalescing batch reads) get secondary ratios. For the list workloads the size
ratio is the time per request of the 1M-purchase user's page over the 10k user's
(rps(10k) / rps(1M)), again per round, then the median. The receipts benchmark
(``ReceiptsRun``) measures the project alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.benchmarks.workloads import WORKLOADS

TIMES = "\N{MULTIPLICATION SIGN}"
MB_150_IN_MIB = 150e6 / 2**20  # the target is in MB; RSS is read in KiB
BASELINE_NAMES = {
    "floor": "floor (a)",
    "hand-written": "hand-written (h)",
    "same-work": "same-work (b)",
    "same-work-coalesced": "same-work (b), batch reads coalesced",
}
# Headline ratios the issue sets (workload, variant): at least this times the baseline.
RATIO_GOALS = {
    ("trivial", ""): 0.80,
    ("get", ""): 0.60,
    ("get-batch", ""): 0.60,
    ("fulfill", ""): 0.60,
    ("list-first", "10k"): 0.60,
    ("list-first", "1M"): 0.60,
}
FULFILL_P99_GOAL = 3.0  # project p99 at most this times the hand-written server's
BATCH_ITEM_CPU_GOAL = 0.25  # a batch item's server CPU over a single call's
DRAIN_GOAL_SECONDS = 10.0
# Receipts sent during the load ÷ fulfils: a deliverer that keeps up still trails by the
# receipts of its last claim when the load stops, so within 1% counts as keeping up.
KEEP_UP_GOAL = 0.99


@dataclass(frozen=True)
class Measurement:
    engine: str  # "sqlite", "postgresql", or "none" for the trivial workloads
    workload: str
    variant: str
    role: str  # "project", "floor", "same-work"
    round: int  # 0 is the warm-up
    seconds: float
    requests: int
    rps: float
    calls_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    peak_rss_mib: float
    rss_start_mib: float
    rss_end_mib: float
    socket_errors: int
    http_errors: int
    rpc_errors: int
    exhausted: int
    fallbacks: int
    load_average: float
    # Server CPU time (all threads) per JSON-RPC call during the measurement; NaN in
    # results recorded before it was measured.
    cpu_us_per_call: float = float("nan")
    # Seconds the server took to become idle after the load (CPU under 5%).
    idle_wait_s: float = float("nan")
    # The project's receipts still to send when the load stopped, and the seconds
    # until none were left (the deliverer runs in serve); 0 for the baselines.
    outbox_backlog: int = 0
    outbox_drain_s: float = 0.0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_mib - self.rss_start_mib) / self.rss_start_mib

    @property
    def errors(self) -> int:
        return self.socket_errors + self.http_errors + self.rpc_errors


@dataclass
class Row:
    engine: str
    workload: str
    variant: str
    baseline: str
    project: list[Measurement] = field(default_factory=list)
    reference: list[Measurement] = field(default_factory=list)
    # The extra baselines' measurements, by role.
    extras: dict[str, list[Measurement]] = field(default_factory=dict)

    def side(self, role: str) -> list[Measurement]:
        return self.reference if role == self.baseline else self.extras.get(role, [])

    def ratios_to(self, role: str) -> list[float]:
        by_round = {m.round: m for m in self.side(role)}
        return [
            m.rps / by_round[m.round].rps
            for m in self.project
            if m.round in by_round and by_round[m.round].rps
        ]

    def cpu_ratios_to(self, role: str) -> list[float]:
        """Per round: baseline CPU per call ÷ project CPU per call (above 1: the project
        spends less). Steadier than throughput on a shared machine: another process
        takes time from a server, not CPU it would have spent per call."""
        by_round = {m.round: m for m in self.side(role)}
        return [
            by_round[m.round].cpu_us_per_call / m.cpu_us_per_call
            for m in self.project
            if m.round in by_round and m.cpu_us_per_call > 0
        ]

    @property
    def ratios(self) -> list[float]:
        return self.ratios_to(self.baseline)

    @property
    def cpu_ratios(self) -> list[float]:
        return self.cpu_ratios_to(self.baseline)

    @property
    def p99_ratios(self) -> list[float]:
        """Per round: the project's p99 over the baseline's."""
        by_round = {m.round: m for m in self.reference}
        return [
            m.p99_ms / by_round[m.round].p99_ms
            for m in self.project
            if m.round in by_round and by_round[m.round].p99_ms
        ]

    @property
    def name(self) -> str:
        return f"{self.workload} {self.variant}".strip()


@dataclass(frozen=True)
class ReceiptsRun:
    """One measurement of the receipts benchmark: the project alone, fulfils at
    saturation, its deliverer on one mail backend ("file", "smtp") or off ("off":
    ``RPC_SERVER_MAIL_IN_SERVE=false``)."""

    engine: str
    backend: str
    round: int
    seconds: float  # of load
    fulfils: int
    fulfils_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    exhausted: int
    sent_during_load: int
    receipts_per_s: float  # sent during the load ÷ its seconds
    backlog_at_stop: int  # receipts still to send when the load stopped
    drain_s: float  # from the load's end until none were left (NaN: off; inf: never)
    sent_in_all: int  # by the end of the drain
    # Cross-check of what left the server: .eml files written, or the sink's count.
    delivered_seen: int
    cpu_us_per_fulfil: float  # server CPU (deliverer included) during the load
    peak_rss_mib: float
    # (seconds since the load started, sent so far, still to send), about every second.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def keeps_up(self) -> float:
        return self.receipts_per_s / self.fulfils_per_s if self.fulfils_per_s else float("nan")

    @property
    def backlog_growth(self) -> float:
        """Receipts to send added per second over the second half of the load (about 0
        when the deliverer keeps up; the fulfil rate when it sends nothing)."""
        if len(self.timeline) < 2:
            return float("nan")
        end = self.timeline[-1]
        half = [point for point in self.timeline if point[0] >= end[0] / 2]
        start = half[0] if half[0] is not end else self.timeline[-2]
        seconds = end[0] - start[0]
        return (end[2] - start[2]) / seconds if seconds > 0 else float("nan")


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _baseline_of(workload: str, roles: set[str]) -> str:
    """The headline baseline: the workload's, if it was measured (a JSON file of an older
    run may have compared with another), else the first baseline measured."""
    known = WORKLOADS.get(workload)
    if known is not None and known.baseline in roles:
        return known.baseline
    for role in BASELINE_NAMES:
        if role in roles:
            return role
    return known.baseline if known is not None else ""


def rows_of(measurements: Sequence[Measurement]) -> list[Row]:
    measured = [m for m in measurements if m.round != 0]
    roles: dict[tuple[str, str, str], set[str]] = {}
    for m in measured:
        roles.setdefault((m.engine, m.workload, m.variant), set()).add(m.role)
    rows: dict[tuple[str, str, str], Row] = {}
    for m in measured:
        key = (m.engine, m.workload, m.variant)
        if key not in rows:
            rows[key] = Row(m.engine, m.workload, m.variant, _baseline_of(m.workload, roles[key]))
        row = rows[key]
        if m.role == "project":
            row.project.append(m)
        elif m.role == row.baseline:
            row.reference.append(m)
        else:
            row.extras.setdefault(m.role, []).append(m)
    return list(rows.values())


def size_ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Time per request of the 1M user's page over the 10k user's, per engine and list."""
    out = []
    index = {(r.engine, r.workload, r.variant): r for r in rows}
    for (engine, workload, variant), small in index.items():
        if variant != "10k" or (engine, workload, "1M") not in index:
            continue
        big = index[(engine, workload, "1M")]
        entry: dict[str, Any] = {"engine": engine, "workload": workload}
        for side in ("project", "reference"):
            small_by_round = {m.round: m for m in getattr(small, side)}
            pairs = [
                (small_by_round[m.round], m)
                for m in getattr(big, side)
                if m.round in small_by_round
            ]
            entry[side] = median(s.rps / b.rps for s, b in pairs)
            entry[f"{side}_p50"] = median(b.p50_ms / s.p50_ms for s, b in pairs if s.p50_ms)
        out.append(entry)
    return out


@dataclass(frozen=True)
class Target:
    what: str
    engine: str
    measured: float
    limit: float
    higher_is_better: bool
    unit: str = TIMES
    note: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


def targets(
    rows: Sequence[Row], duration: float, receipts: Sequence[ReceiptsRun] = ()
) -> list[Target]:
    out: list[Target] = []
    for row in rows:
        goal = RATIO_GOALS.get((row.workload, row.variant))
        if goal is not None and row.ratios:
            out.append(
                Target(
                    f"{row.name} ≥ {goal:.2f}{TIMES} {BASELINE_NAMES[row.baseline]}",
                    row.engine,
                    median(row.ratios),
                    goal,
                    True,
                    note=(
                        f"CPU-time ratio {median(row.cpu_ratios):.2f}{TIMES}"
                        if row.cpu_ratios
                        else ""
                    ),
                )
            )
        if row.workload == "fulfill" and row.p99_ratios:
            p99 = _side(row.project)["latency"].split(" / ")[1]
            base_p99 = _side(row.reference)["latency"].split(" / ")[1]
            out.append(
                Target(
                    f"fulfill p99 ≤ {FULFILL_P99_GOAL:g}{TIMES} {BASELINE_NAMES[row.baseline]}'s",
                    row.engine,
                    median(row.p99_ratios),
                    FULFILL_P99_GOAL,
                    False,
                    note=f"{p99} ms against {base_p99} ms",
                )
            )
    index = {(r.engine, r.workload, r.variant): r for r in rows}
    for (engine, workload, _variant), batch in index.items():
        single = index.get((engine, "get", ""))
        if workload != "get-batch" or single is None:
            continue
        batch_cpu = median(m.cpu_us_per_call for m in batch.project)
        single_cpu = median(m.cpu_us_per_call for m in single.project)
        out.append(
            Target(
                f"a batch item's server CPU ≤ {BATCH_ITEM_CPU_GOAL:g} of a single "
                "purchase.get's (project)",
                engine,
                batch_cpu / single_cpu,
                BATCH_ITEM_CPU_GOAL,
                False,
                note=f"{_fmt(batch_cpu)} µs per item against {_fmt(single_cpu)} µs per call",
            )
        )
    out += receipts_targets(receipts)
    for entry in size_ratios(rows):
        what = f"{entry['workload']}: 1M-user page ≤ 1.3{TIMES} the 10k-user page's time"
        out.append(Target(what, entry["engine"], entry["project"], 1.3, False))
    for row in rows:
        if row.workload != "mixed" or not row.project:
            continue
        out.append(
            Target(
                f"mixed: peak RSS ≤ 150 MB ({MB_150_IN_MIB:.0f} MiB)",
                row.engine,
                max(m.peak_rss_mib for m in row.project),
                MB_150_IN_MIB,
                False,
                " MiB",
            )
        )
        soak = "" if duration >= 300 else f"measured over {duration:g} s, not the 5-minute run"
        out.append(
            Target(
                "mixed: RSS growth ≤ 10%",
                row.engine,
                100 * max(m.rss_growth for m in row.project),
                10,
                False,
                "%",
                soak,
            )
        )
    return out


def receipts_targets(runs: Sequence[ReceiptsRun]) -> list[Target]:
    out: list[Target] = []
    groups: dict[tuple[str, str], list[ReceiptsRun]] = {}
    for run in runs:
        if run.round > 0 and run.backend != "off":
            groups.setdefault((run.engine, run.backend), []).append(run)
    for (engine, backend), group in groups.items():
        out.append(
            Target(
                f"receipts: delivered per second ≥ fulfils per second, within 1% ({backend} "
                "mailer)",
                engine,
                median(r.keeps_up for r in group),
                KEEP_UP_GOAL,
                True,
                note=f"{_fmt(median(r.receipts_per_s for r in group))} receipts/s against "
                f"{_fmt(median(r.fulfils_per_s for r in group))} fulfils/s",
            )
        )
        out.append(
            Target(
                f"receipts: backlog drained within {DRAIN_GOAL_SECONDS:g} s of the load "
                f"stopping ({backend} mailer)",
                engine,
                max(r.drain_s for r in group),
                DRAIN_GOAL_SECONDS,
                False,
                " s",
                note=f"backlog at stop {_fmt(median(r.backlog_at_stop for r in group))}",
            )
        )
    return out


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "—"
    if value in (float("inf"), float("-inf")):
        return "∞"
    return f"{value:,.{digits}f}"


def _side(ms: Sequence[Measurement]) -> dict[str, str]:
    return {
        "rps": _fmt(median(m.rps for m in ms)),
        "calls": _fmt(median(m.calls_per_second for m in ms)),
        "latency": f"{_fmt(median(m.p50_ms for m in ms), 1)} / "
        f"{_fmt(median(m.p99_ms for m in ms), 1)}",
        "rss": _fmt(max((m.peak_rss_mib for m in ms), default=float("nan"))),
        "cpu": _fmt(median(m.cpu_us_per_call for m in ms)),
        "errors": str(sum(m.errors for m in ms)),
    }


def engine_label(engine: str) -> str:
    return {"none": "— (no DB)", "sqlite": "SQLite", "postgresql": "PostgreSQL"}[engine]


def results_table(rows: Sequence[Row]) -> str:
    lines = [
        "| workload | engine | baseline | project req/s | baseline req/s "
        "| ratio (median; per round) "
        "| project calls/s | project p50 / p99 ms | baseline p50 / p99 ms "
        "| project peak RSS MiB | baseline peak RSS MiB "
        "| server CPU µs per call (project / baseline) | CPU-time ratio (median) "
        "| errors (project / baseline) |",
        "|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        p, b = _side(row.project), _side(row.reference)
        per_round = ", ".join(f"{r:.2f}" for r in row.ratios)
        lines.append(
            f"| {row.name} | {engine_label(row.engine)} "
            f"| {BASELINE_NAMES.get(row.baseline, row.baseline)} "
            f"| {p['rps']} | {b['rps']} | **{_fmt(median(row.ratios), 2)}{TIMES}** ({per_round}) "
            f"| {p['calls']} | {p['latency']} | {b['latency']} | {p['rss']} | {b['rss']} "
            f"| {p['cpu']} / {b['cpu']} | {_fmt(median(row.cpu_ratios), 2)}{TIMES} "
            f"| {p['errors']} / {b['errors']} |"
        )
    return "\n".join(lines)


def extras_table(rows: Sequence[Row]) -> str:
    """The project against the extra baselines (secondary ratios)."""
    lines = [
        "| workload | engine | baseline | baseline req/s | ratio (median; per round) "
        "| baseline p50 / p99 ms | server CPU µs per call (project / baseline) "
        "| CPU-time ratio (median) | baseline errors |",
        "|---|---|---|--:|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        p = _side(row.project)
        for role, measurements in row.extras.items():
            b = _side(measurements)
            ratios = row.ratios_to(role)
            per_round = ", ".join(f"{r:.2f}" for r in ratios)
            lines.append(
                f"| {row.name} | {engine_label(row.engine)} | {BASELINE_NAMES.get(role, role)} "
                f"| {b['rps']} | {_fmt(median(ratios), 2)}{TIMES} ({per_round}) "
                f"| {b['latency']} | {p['cpu']} / {b['cpu']} "
                f"| {_fmt(median(row.cpu_ratios_to(role)), 2)}{TIMES} | {b['errors']} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def outbox_table(rows: Sequence[Row]) -> str:
    """The project's receipts after each measurement of the workloads that fulfil."""
    lines = [
        "| workload | engine | receipts to send when the load stopped (median; per round) "
        "| seconds until all were sent (median; per round) |",
        "|---|---|--:|--:|",
    ]
    for row in rows:
        if not WORKLOADS.get(row.workload, WORKLOADS["get"]).consumes or not row.project:
            continue
        backlog = [m.outbox_backlog for m in row.project]
        drain = [m.outbox_drain_s for m in row.project]
        lines.append(
            f"| {row.name} | {engine_label(row.engine)} "
            f"| {_fmt(median(backlog))} ({', '.join(_fmt(b) for b in backlog)}) "
            f"| {_fmt(median(drain), 1)} ({', '.join(_fmt(d, 1) for d in drain)}) |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def receipts_table(runs: Sequence[ReceiptsRun]) -> str:
    measured = [r for r in runs if r.round > 0]
    if not measured:
        return ""
    lines = [
        "| engine | deliverer | round | load s | fulfils/s | fulfil p50 / p99 ms "
        "| receipts sent/s during the load | sent ÷ fulfils | backlog growth/s (2nd half) "
        "| to send at stop "
        "| s until none left | sent in all | seen delivered | server CPU µs per fulfil "
        "| peak RSS MiB | errors (exhausted) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    names = {"file": "on, file mailer", "smtp": "on, SMTP to a local sink", "off": "off"}
    for r in measured:
        lines.append(
            f"| {engine_label(r.engine)} | {names.get(r.backend, r.backend)} | {r.round} "
            f"| {_fmt(r.seconds, 1)} | {_fmt(r.fulfils_per_s)} "
            f"| {_fmt(r.p50_ms, 1)} / {_fmt(r.p99_ms, 1)} | {_fmt(r.receipts_per_s)} "
            f"| {_fmt(r.keeps_up, 3)} | {_fmt(r.backlog_growth)} | {_fmt(r.backlog_at_stop)} "
            f"| {_fmt(r.drain_s, 1)} "
            f"| {_fmt(r.sent_in_all)} | {_fmt(r.delivered_seen)} "
            f"| {_fmt(r.cpu_us_per_fulfil)} | {_fmt(r.peak_rss_mib)} "
            f"| {r.errors} ({r.exhausted}) |"
        )
    stretch = receipts_latency(measured)
    if stretch:
        lines += [
            "",
            "| engine | deliverer | fulfil p50 on ÷ off | fulfil p99 on ÷ off |",
            "|---|---|--:|--:|",
        ]
        for engine, backend, p50, p99 in stretch:
            lines.append(
                f"| {engine_label(engine)} | {names.get(backend, backend)} "
                f"| {_fmt(p50, 2)}{TIMES} | {_fmt(p99, 2)}{TIMES} |"
            )
    return "\n".join(lines)


def receipts_latency(runs: Sequence[ReceiptsRun]) -> list[tuple[str, str, float, float]]:
    """Per engine and backend: how much the running deliverer stretches fulfil latency
    (medians over rounds, against the runs with the deliverer off)."""
    out = []
    engines = dict.fromkeys(r.engine for r in runs)
    for engine in engines:
        off = [r for r in runs if r.engine == engine and r.backend == "off"]
        if not off:
            continue
        for backend in ("file", "smtp"):
            on = [r for r in runs if r.engine == engine and r.backend == backend]
            if on:
                out.append((
                    engine,
                    backend,
                    median(r.p50_ms for r in on) / median(r.p50_ms for r in off),
                    median(r.p99_ms for r in on) / median(r.p99_ms for r in off),
                ))  # fmt: skip
    return out


def size_table(rows: Sequence[Row]) -> str:
    entries = size_ratios(rows)
    if not entries:
        return ""
    lines = [
        "| list page | engine | project: time 1M / 10k (req/s ratio) | project p50 ratio "
        "| baseline: time 1M / 10k | baseline p50 ratio |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['workload']} | {engine_label(e['engine'])} | {_fmt(e['project'], 2)}{TIMES} "
            f"| {_fmt(e['project_p50'], 2)}{TIMES} | {_fmt(e['reference'], 2)}{TIMES} "
            f"| {_fmt(e['reference_p50'], 2)}{TIMES} |"
        )
    return "\n".join(lines)


def targets_table(goals: Sequence[Target]) -> str:
    lines = ["| target | engine | measured | verdict |", "|---|---|--:|---|"]
    for t in goals:
        measured = f"{_fmt(t.measured, 2 if t.unit == TIMES else 1)}{t.unit}"
        verdict = "met" if t.met else "**not met**"
        if t.note:
            verdict += f" ({t.note})"
        lines.append(f"| {t.what} | {engine_label(t.engine)} | {measured} | {verdict} |")
    return "\n".join(lines)


def round_trips_table(counts: Sequence[dict[str, Any]]) -> str:
    if not counts:
        return ""
    lines = [
        "| call | engine | project: driver round trips | project: SQL statements "
        "(BEGIN/COMMIT/ROLLBACK) | project: pool checkouts | project: connections opened "
        "| hand-written (h): driver round trips | same-work (b): driver round trips |",
        "|---|---|--:|---|--:|--:|--:|--:|",
    ]
    for c in counts:
        p = c["project"]
        # Older JSON: "baseline" was same-work (b).
        h, b = c.get("hand-written"), c.get("same-work", c.get("baseline"))

        def trips(side: dict[str, float] | None) -> str:
            return "—" if side is None else f"{side.get('driver_round_trips', 0):.2f}"

        lines.append(
            f"| {c['call']} | {engine_label(c['engine'])} | {p.get('driver_round_trips', 0):.2f} "
            f"| {p.get('sql_statements', 0):.2f} "
            f"({p.get('sql_begin', 0):.2f}/{p.get('sql_commit', 0):.2f}/"
            f"{p.get('sql_rollback', 0):.2f}) | {p.get('pool_checkouts', 0):.2f} "
            f"| {p.get('connections_opened', 0):.2f} | {trips(h)} | {trips(b)} |"
        )
    return "\n".join(lines)
