"""Starting real ``rpc-server`` processes from tests, and waiting for them to answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.payments import TEST_PAYMENT_KEY

RPC_SERVER = str(Path(sys.executable).parent / "rpc-server")
PAYMENT_KEYS_VARIABLE = "RPC_SERVER_PAYMENT_KEYS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(
    port: int, process: subprocess.Popen[str], log: IO[str] | None = None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            if process.poll() is not None:
                output = process.communicate()[0] if log is None else _read(log)
                raise RuntimeError(f"server exited early:\n{output}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _read(log: IO[str]) -> str:
    log.seek(0)
    return log.read()


@contextmanager
def running_server(
    env: Mapping[str, str], *args: str, cwd: Path | None = None, output: list[str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Start ``rpc-server serve`` on a free port; SIGTERM it on exit and check it exits 0.

    The server verifies payment proofs signed with ``tests.payments.TEST_PAYMENT_KEY``
    (``RPC_SERVER_PAYMENT_KEYS``) unless ``env`` says otherwise.

    The server's output goes to a file, not a pipe: a busy server logs more than a pipe
    holds, and would block in its logging call if nobody read the pipe meanwhile. With
    ``output``, the whole output is appended to it once the server has exited.
    """
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [RPC_SERVER, "serve", "--port", str(port), *args],
            cwd=cwd,
            env={**os.environ, PAYMENT_KEYS_VARIABLE: TEST_PAYMENT_KEY, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until_healthy(port, process, log)
            yield port, process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            if output is not None:
                output.append(_read(log))
            if process.returncode != 0:
                log.seek(0)
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read()}")
