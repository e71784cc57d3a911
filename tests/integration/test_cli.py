"""The ``rpc-server`` console script, run as a user runs it: a real process, a real file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RPC_SERVER = str(Path(sys.executable).parent / "rpc-server")


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RPC_SERVER, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, payload: object, token: str | None = None) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rpc",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The default database is a file in the working directory: make sure it is ours.
    monkeypatch.delenv("RPC_SERVER_DATABASE_URL", raising=False)
    return tmp_path


def test_migrate_creates_the_default_sqlite_file(workdir: Path) -> None:
    result = run("migrate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / "rpc_server.sqlite3").exists()


def test_create_token_prints_the_token_last_and_create_course_validates(workdir: Path) -> None:
    assert run("migrate", cwd=workdir).returncode == 0
    token = run("create-token", "carol@example.com", cwd=workdir)
    assert token.returncode == 0, token.stderr
    last_line = token.stdout.strip().splitlines()[-1]
    assert last_line.startswith("rpcs_") and len(last_line) > 40

    bad = run("create-course", "go-101", "--title", "Go", "--price", "1.234", "--currency", "usd",
              cwd=workdir)  # fmt: skip
    assert bad.returncode == 2
    assert "--price" in bad.stderr and "--currency" in bad.stderr
    good = run("create-course", "go-101", "--title", "Go", "--price", "12.5", "--currency", "EUR",
               cwd=workdir)  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "12.50 EUR" in good.stdout or "12.5 EUR" in good.stdout


def test_bad_setting_is_reported_not_raised(workdir: Path) -> None:
    result = run("migrate", cwd=workdir, env={"RPC_SERVER_PORT": "eighty"})
    assert result.returncode == 2
    assert "RPC_SERVER_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_demo_is_idempotent_and_serve_answers(workdir: Path) -> None:
    first = run("seed-demo", cwd=workdir)
    second = run("seed-demo", cwd=workdir)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "demo-alice" in first.stdout

    port = free_port()
    server = subprocess.Popen(
        [RPC_SERVER, "serve", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        courses = post(port, {"jsonrpc": "2.0", "method": "course.list", "id": 1})
        purchases = post(port, {"jsonrpc": "2.0", "method": "purchase.list", "id": 2}, "demo-alice")
        example = subprocess.run(
            [str(EXAMPLES / "curl.sh")],
            env={**os.environ, "RPC_URL": f"http://127.0.0.1:{port}/rpc"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert len(courses["result"]) == 3  # type: ignore[index]
    # Seeding twice created alice's two demo purchases once.
    assert len(purchases["result"]["items"]) == 2  # type: ignore[index]
    assert server.returncode == 0, output
    assert example.returncode == 0, example.stdout + example.stderr
    assert "(identical)" in example.stdout
    assert "HTTP 500" not in example.stderr
