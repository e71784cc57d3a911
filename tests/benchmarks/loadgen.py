"""The load generator: wrk (Debian's package) driven by the Lua scripts in ``lua/``.

Why wrk rather than an aiohttp client: the machine has two cores, one for the server
under test and one for the load. A Python client spends about as much CPU per request
as the bare-aiohttp floor does, so on one core it would saturate before the floor does
and every ratio against the floor would read too high. wrk (C, epoll, LuaJIT) needs a
small fraction of a core for the same rate, so the server is always the bottleneck.

Plans are files the harness writes (``write_replay_plan``, ``write_mixed_plan``); each
run writes its summary (requests, duration, latency percentiles, socket and JSON-RPC
error counts) as JSON through the script's ``done()``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA = Path(__file__).parent / "lua"
REPLAY_SCRIPT = LUA / "replay.lua"
MIXED_SCRIPT = LUA / "mixed.lua"


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    socket_errors: int
    rpc_errors: int
    http_errors: int
    exhausted: int
    fallbacks: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> LoadResult:
        latency = summary["latency_us"]
        return cls(
            requests=summary["requests"],
            seconds=summary["duration_us"] / 1e6,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            mean_ms=latency["mean"] / 1000,
            socket_errors=sum(summary["socket_errors"].values()),
            rpc_errors=summary["rpc_errors"],
            http_errors=summary["http_errors"],
            exhausted=summary["exhausted"],
            fallbacks=summary["fallbacks"],
        )


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise LoadError("wrk is not installed: apt-get install -y wrk")
    return path


def write_replay_plan(
    path: Path, requests: Iterable[tuple[str | None, bytes]], *, consume: bool = False
) -> Path:
    """One request per line: the Authorization value (or "-") and the JSON body."""
    with path.open("wb") as out:
        out.write(b"consume\n" if consume else b"cycle\n")
        for authorization, body in requests:
            if b"\n" in body or b"\t" in body:
                raise ValueError("a request body must be one line without tabs")
            out.write((authorization or "-").encode() + b"\t" + body + b"\n")
    return path


def write_mixed_plan(
    path: Path,
    *,
    pattern: str,
    tag: str,
    courses: Sequence[str],
    payments: str,
    users: Sequence[tuple[str, Sequence[str], Sequence[str]]],
) -> Path:
    """``courses``: to buy, each once; ``payments``: the Authorization value of the
    payment backend (it fulfils); ``users``: (Authorization value, ids of own purchases,
    ids of fresh pending ones)."""
    lines = [f"mixed\npattern\t{pattern}\ntag\t{tag}"]
    lines += [f"course\t{slug}" for slug in courses]
    lines.append(f"payments\t{payments}")
    for authorization, _own, _fresh in users:
        lines.append(f"user\t{authorization}")
    for number, (_authorization, own, fresh) in enumerate(users, 1):
        lines += [f"own\t{number}\t{pid}" for pid in own]
        lines += [f"fresh\t{number}\t{pid}" for pid in fresh]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pinned(cpus: set[int] | None) -> Any:
    if not cpus:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


async def run_wrk(
    url: str,
    *,
    script: Path,
    plan: Path,
    result: Path,
    seconds: float,
    connections: int,
    threads: int,
    cpus: set[int] | None,
) -> LoadResult:
    """Run wrk against ``url`` for ``seconds``; return its summary."""
    _remove(result)
    env = {
        **os.environ,
        "BENCH_PLAN": str(plan),
        "BENCH_RESULT": str(result),
        "BENCH_THREADS": str(threads),
    }
    command = [
        wrk_path(),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, math.ceil(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_pinned(cpus),
    )
    output, _ = await process.communicate()
    summary = _read_summary(result)
    if process.returncode != 0 or summary is None:
        raise LoadError(f"wrk failed ({process.returncode}):\n{output.decode(errors='replace')}")
    return LoadResult.from_summary(summary)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return summary
