"""The examples in ``examples/`` run as users run them, against a real ``rpc-server serve``.

Each test seeds the demo data into its own SQLite file, starts the server on a free port
(``tests.processes.running_server``) and runs one example against it: the Python client,
the Node.js client (skipped only where ``node`` is missing) and the browser frontend in
headless Chromium, served over HTTP from an origin of its own and calling the server
through CORS. Chromium is Debian's (``.ci/run`` installs it); without it the browser test
fails rather than skips, so CI can never pass without having run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Request, expect, sync_playwright

from tests.conftest import FRONTEND_URL, sqlite_url
from tests.processes import RPC_SERVER, running_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    """Settings for a server on a fresh SQLite file holding the demo data (``seed-demo``)."""
    env = {
        "RPC_SERVER_DATABASE_URL": sqlite_url(tmp_path / "demo.sqlite3"),
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_FRONTEND_URL": FRONTEND_URL,
    }
    seeded = subprocess.run(
        [RPC_SERVER, "seed-demo"],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    return env


def run_example(command: list[str], rpc_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={**os.environ, "RPC_URL": rpc_url, "TOKEN": "demo-alice"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def rpc(rpc_url: str, method: str, params: Any, token: str) -> Any:
    """One call over plain HTTP, to check what the examples did; returns the parsed body."""
    request = urllib.request.Request(
        rpc_url,
        data=json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_python_client_runs_green(demo_env: dict[str, str], tmp_path: Path) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        result = run_example(
            [sys.executable, str(EXAMPLES / "python_client.py")], f"http://127.0.0.1:{port}/rpc"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "purchase.fulfill again: identical answer" in result.stdout
    assert f"redirect_url: {FRONTEND_URL}/courses/" in result.stdout
    assert "batch missing: error 404" in result.stdout
    assert "error: code=409" in result.stdout
    assert result.stdout.rstrip().endswith("all calls answered as expected")


def install_node_dependencies() -> None:
    """``npm ci`` in examples/ unless jayson is installed already (CI installs it first)."""
    if (EXAMPLES / "node_modules" / "jayson" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is installed but npm is not: install npm to run the Node.js example")
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr


def test_node_client_runs_green(demo_env: dict[str, str], tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "node is not installed: the Node.js example (examples/node_client.mjs) needs it"
        )
    install_node_dependencies()
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        result = run_example(
            [node, str(EXAMPLES / "node_client.mjs")], f"http://127.0.0.1:{port}/rpc"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "purchase.fulfill again: identical answer" in result.stdout
    assert f"fulfilled {FRONTEND_URL}/courses/" in result.stdout
    assert "batch missing: error 404" in result.stdout
    assert "error: code=409" in result.stdout
    assert result.stdout.rstrip().endswith("all calls answered as expected")


class QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def frontend_origin() -> Iterator[str]:
    """Serve examples/frontend over HTTP on a free port; yield its origin."""
    handler = partial(QuietFileHandler, directory=str(EXAMPLES / "frontend"))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, name="frontend", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join(timeout=10)


def test_frontend_lists_and_fulfills_with_one_batch_through_cors(
    demo_env: dict[str, str], frontend_origin: str, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        reason = (
            f"Chromium is missing at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (.ci/run does this) to run the browser test"
        )
        # In CI the browser test must run; on a developer's machine say what is missing.
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**demo_env, "RPC_SERVER_CORS_ORIGINS": frontend_origin}
    with running_server(env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        listed = rpc(rpc_url, "purchase.list", {}, "demo-alice")["result"]["items"]
        # The demo data gives alice one pending purchase and one fulfilled one.
        (pending,) = [item for item in listed if item["state"] == "pending"]
        purchase_id = pending["purchase_id"]
        query = urlencode({"rpc": rpc_url, "token": "demo-alice"})

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page_errors: list[str] = []
                page.on("pageerror", lambda error: page_errors.append(str(error)))
                page.goto(f"{frontend_origin}/index.html?{query}")

                table = page.locator("#purchases")
                expect(table).to_have_attribute("data-loaded", "true")
                rows = table.locator("tbody tr[data-purchase-id]")
                expect(rows).to_have_count(len(listed))
                shown = {rows.nth(i).get_attribute("data-purchase-id") for i in range(len(listed))}
                assert shown == {item["purchase_id"] for item in listed}

                row = table.locator(f'tr[data-purchase-id="{purchase_id}"]')
                expect(row.locator('[data-field="state"]')).to_have_text("pending")
                posts: list[Request] = []
                page.on(
                    "request", lambda sent: posts.append(sent) if sent.method == "POST" else None
                )
                row.locator('button[data-action="fulfill"]').click()

                expect(page.locator("#outcome")).to_be_visible()
                expect(row).to_have_attribute("data-state", "fulfilled")
                expect(row.locator('[data-field="state"]')).to_have_text("fulfilled")
                expect(row.locator('button[data-action="fulfill"]')).to_have_count(0)
                expect(page.locator("#redirect-url")).to_have_text(
                    f"{FRONTEND_URL}/courses/{pending['course']}/start"
                )
                # One POST carried the whole batch: the fulfillment and the refreshed list.
                assert [[item["method"] for item in sent.post_data_json] for sent in posts] == [
                    ["purchase.fulfill", "purchase.list"]
                ]
                assert page_errors == []
            finally:
                browser.close()

        answer = rpc(rpc_url, "purchase.get", {"purchase_id": purchase_id}, "demo-alice")
        assert answer["result"]["state"] == "fulfilled"
