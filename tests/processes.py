"""Starting real ``rpc-server`` processes from tests, and waiting for them to answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

RPC_SERVER = str(Path(sys.executable).parent / "rpc-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(port: int, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{process.communicate()[0]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def running_server(
    env: Mapping[str, str], *args: str, cwd: Path | None = None
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Start ``rpc-server serve`` on a free port; SIGTERM it on exit and check it exits 0."""
    port = free_port()
    process = subprocess.Popen(
        [RPC_SERVER, "serve", "--port", str(port), *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_healthy(port, process)
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        if process.returncode != 0:
            raise AssertionError(f"server exited with {process.returncode}:\n{output}")
