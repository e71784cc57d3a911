"""Servers under test as processes: started pinned to the server CPUs, watched, stopped.

Every server (the project, the floor, the hand-written and same-work baselines) runs
alone in its own
process, pinned the same way (``--server-cpus``), on a free loopback port, with its
output in a log file. ``peak_rss_kib`` reads the kernel's high-water mark (VmHWM), which
``reset_peak`` clears before each measurement (``/proc/PID/clear_refs``), so every
measurement gets its own peak; ``rss_kib`` is the current VmRSS, sampled for growth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.processes import RPC_SERVER, free_port

PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Idle: under 5% of a CPU over two consecutive 0.3 s intervals.
IDLE_INTERVAL = 0.3
IDLE_CPU_SHARE = 0.05
REPO = Path(__file__).resolve().parents[2]  # servers run from here: ``-m tests.…`` resolves


@dataclass
class ServerProcess:
    """One server under test. ``role`` is "project", "floor", "hand-written", "same-work"
    or "same-work-coalesced"."""

    role: str
    command: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cpus: set[int] | None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rpc"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> None:
        cpus = self.cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        command = [part.replace("{port}", str(self.port)) for part in self.command]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                preexec_fn=pin,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.role} server exited early:\n{self.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.role} server did not answer:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def peak_rss_kib(self) -> int:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    async def wait_idle(self, within: float = 300) -> float:
        """Wait until the server has worked off what the last load left queued (a closed
        connection does not cancel its handler); return the seconds waited."""
        started = time.monotonic()
        quiet = 0
        before = self.cpu_seconds()
        while quiet < 2 and time.monotonic() - started < within:
            await asyncio.sleep(IDLE_INTERVAL)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - before < IDLE_CPU_SHARE * IDLE_INTERVAL else 0
            before = now
        return time.monotonic() - started

    def reset_peak(self) -> None:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


async def wait_for_file(path: Path, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.05)


def exists(path: Path) -> bool:
    return path.exists()


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def project_env(database_url: str, workdir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The project as deployed, with its defaults on: rate limits on (their cost belongs
    in the figures) but at limits the load never reaches (it comes from a few tokens and
    one address), the receipt deliverer running in ``serve`` (the file mailer, into
    ``mail/`` of the work directory), INFO logging with the access log, one process."""
    return {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_RATE_LIMIT": "100000",
        "RPC_SERVER_RATE_BURST": "1000000",
        # rpc.discover loads come without a token (a discover weighs more than one call).
        "RPC_SERVER_ANONYMOUS_RATE_LIMIT": "10000000",
        "RPC_SERVER_ANONYMOUS_RATE_BURST": "100000000",
        # The load's few buyers hold many open purchases (the cap is not measured).
        "RPC_SERVER_MAX_PENDING_PURCHASES": "1000000",
        "RPC_SERVER_MAIL_DIR": str(workdir / "mail"),
        "RPC_SERVER_WORKERS": "1",
        **extra,
    }


def project_server(
    database_url: str,
    workdir: Path,
    cpus: set[int] | None,
    extra_env: Mapping[str, str],
    *,
    instrument: Sequence[str] = (),
    name: str = "project",
) -> ServerProcess:
    """``rpc-server serve``; with ``instrument`` flags, the instrumented launcher instead."""
    if instrument:
        command = [PYTHON, "-m", "tests.benchmarks.project_server", "--port", "{port}"]
        command += instrument
    else:
        command = [RPC_SERVER, "serve", "--host", "127.0.0.1", "--port", "{port}"]
    return ServerProcess(
        role="project",
        command=command,
        env=project_env(database_url, workdir, extra_env),
        log_path=workdir / f"{name}.log",
        cpus=cpus,
    )


def floor_server(
    document: Path, workdir: Path, cpus: set[int] | None, *, instrument: Sequence[str] = ()
) -> ServerProcess:
    command = [PYTHON, "-m", "tests.benchmarks.floor", "--port", "{port}"]
    return ServerProcess(
        role="floor",
        command=[*command, "--document", str(document), *instrument],
        env={},
        log_path=workdir / "floor.log",
        cpus=cpus,
    )


def handwritten_server(
    database_url: str,
    workdir: Path,
    cpus: set[int] | None,
    pool_size: int,
    *,
    instrument: Sequence[str] = (),
    name: str = "hand-written",
) -> ServerProcess:
    """Baseline (h), the denominator of the database workloads (handwritten.py)."""
    command = [PYTHON, "-m", "tests.benchmarks.handwritten", "--port", "{port}"]
    command += ["--database-url", database_url, "--pool-size", str(pool_size), *instrument]
    return ServerProcess(
        role="hand-written", command=command, env={}, log_path=workdir / f"{name}.log", cpus=cpus
    )


def same_work_server(
    database_url: str,
    workdir: Path,
    cpus: set[int] | None,
    pool_size: int,
    *,
    instrument: Sequence[str] = (),
    name: str = "same-work",
    coalesce_batch_reads: bool = False,
) -> ServerProcess:
    """Baseline (b); with ``coalesce_batch_reads``, its variant for ``get-batch-coalesced``
    (role "same-work-coalesced")."""
    command = [PYTHON, "-m", "tests.benchmarks.same_work", "--port", "{port}"]
    command += ["--database-url", database_url, "--pool-size", str(pool_size), *instrument]
    role = "same-work"
    if coalesce_batch_reads:
        command.append("--coalesce-batch-reads")
        role = name = "same-work-coalesced"
    return ServerProcess(
        role=role, command=command, env={}, log_path=workdir / f"{name}.log", cpus=cpus
    )
