"""Turning measurements into medians, ratios, target verdicts and the Markdown report.

Ratios are per round: the project's requests per second divided by its baseline's in
the same round (measured back to back), then the median over the rounds. For the list
workloads the size ratio is the time per request of the 1M-purchase user's page over
the 10k user's (rps(10k) / rps(1M)), again per round, then the median.
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
    "same-work": "same-work (b)",
    "same-work-coalesced": "same-work (b), batch reads coalesced",
}


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

    @property
    def ratios(self) -> list[float]:
        by_round = {m.round: m for m in self.reference}
        return [m.rps / by_round[m.round].rps for m in self.project if m.round in by_round]

    @property
    def cpu_ratios(self) -> list[float]:
        """Per round: baseline CPU per call ÷ project CPU per call (above 1: the project
        spends less). Steadier than throughput on a shared machine: another process
        takes time from a server, not CPU it would have spent per call."""
        by_round = {m.round: m for m in self.reference}
        return [
            by_round[m.round].cpu_us_per_call / m.cpu_us_per_call
            for m in self.project
            if m.round in by_round and m.cpu_us_per_call > 0
        ]

    @property
    def name(self) -> str:
        return f"{self.workload} {self.variant}".strip()


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def rows_of(measurements: Sequence[Measurement]) -> list[Row]:
    rows: dict[tuple[str, str, str], Row] = {}
    for m in measurements:
        if m.round == 0:
            continue
        key = (m.engine, m.workload, m.variant)
        if key not in rows:
            rows[key] = Row(m.engine, m.workload, m.variant, WORKLOADS[m.workload].baseline)
        (rows[key].project if m.role == "project" else rows[key].reference).append(m)
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


def targets(rows: Sequence[Row], duration: float) -> list[Target]:
    goals = {
        ("trivial", ""): 0.80,
        ("trivial-batch", ""): 0.30,
        ("get", ""): 0.60,
        ("get-batch", ""): 0.60,
        ("fulfill", ""): 0.50,
    }
    out: list[Target] = []
    for row in rows:
        goal = goals.get((row.workload, row.variant))
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


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "—"
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
            f"| {row.name} | {engine_label(row.engine)} | {BASELINE_NAMES[row.baseline]} "
            f"| {p['rps']} | {b['rps']} | **{_fmt(median(row.ratios), 2)}{TIMES}** ({per_round}) "
            f"| {p['calls']} | {p['latency']} | {b['latency']} | {p['rss']} | {b['rss']} "
            f"| {p['cpu']} / {b['cpu']} | {_fmt(median(row.cpu_ratios), 2)}{TIMES} "
            f"| {p['errors']} / {b['errors']} |"
        )
    return "\n".join(lines)


def size_table(rows: Sequence[Row]) -> str:
    entries = size_ratios(rows)
    if not entries:
        return ""
    lines = [
        "| list page | engine | project: time 1M / 10k (req/s ratio) | project p50 ratio "
        "| same-work: time 1M / 10k | same-work p50 ratio |",
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
        "| baseline: driver round trips (= statements) |",
        "|---|---|--:|---|--:|--:|--:|",
    ]
    for c in counts:
        p, b = c["project"], c["baseline"]
        lines.append(
            f"| {c['call']} | {engine_label(c['engine'])} | {p.get('driver_round_trips', 0):.2f} "
            f"| {p.get('sql_statements', 0):.2f} "
            f"({p.get('sql_begin', 0):.2f}/{p.get('sql_commit', 0):.2f}/"
            f"{p.get('sql_rollback', 0):.2f}) | {p.get('pool_checkouts', 0):.2f} "
            f"| {p.get('connections_opened', 0):.2f} | {b.get('driver_round_trips', 0):.2f} |"
        )
    return "\n".join(lines)
