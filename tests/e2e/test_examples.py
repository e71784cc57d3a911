"""The examples in ``examples/`` run as users run them, against a real ``rpc-server serve``.

Each test seeds the demo data (``rpc-server seed-demo``) into a database of its own (on
each engine), starts the server on a free port (``tests.processes.running_server``) and
the example payment provider (``examples/payment_provider.py``, a real process, signing
with the public demo key the server accepts while the demo data is live), then runs one
example against them: curl.sh, the Python client, the Node.js client (skipped only where
``node`` is missing, outside CI) and the browser frontend in headless Chromium, served
over HTTP from an origin of its own and calling the server and the provider through CORS.
Chromium is Debian's (``.ci/run`` installs it); without it the browser test fails in CI
rather than skips, so CI can never pass without having run it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from playwright.sync_api import Request, expect, sync_playwright
from standardwebhooks import Webhook

from rpc_server.cli.demo import DEMO_PAYMENT_KEY
from tests.conftest import FRONTEND_URL
from tests.node_packages import EXAMPLES, in_ci, install_node_dependencies, require_node
from tests.processes import RPC_SERVER, free_port, running_server

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
def demo_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Settings for a server on a fresh database holding the demo data (``seed-demo``)."""
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_FRONTEND_URL": FRONTEND_URL,
        # As a newcomer runs it: no key of one's own, so serve verifies with the demo key.
        "RPC_SERVER_PAYMENT_KEYS": "",
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


@contextmanager
def running_provider(
    server_port: int, *, cors_origin: str = "", webhook: bool = True
) -> Iterator[str]:
    """Run ``python examples/payment_provider.py`` for the server on ``server_port``;
    yield its base URL. ``webhook=False``: it posts no webhook (WEBHOOK_URL empty)."""
    port = free_port()
    env = {
        **os.environ,
        "PROVIDER_PORT": str(port),
        "RPC_URL": f"http://127.0.0.1:{server_port}/rpc",
        "WEBHOOK_URL": f"http://127.0.0.1:{server_port}/webhooks/payments" if webhook else "",
        "PROVIDER_CORS_ORIGINS": cors_origin,
    }
    env.pop("PAYMENT_KEY", None)  # the default: the public demo key
    env.pop("PAYMENTS_TOKEN", None)  # the default: demo-payments
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "payment_provider.py")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/", timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        output = log.read()
                        raise AssertionError(f"the provider did not start:\n{output}") from None
                    time.sleep(0.1)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            log.seek(0)
            output = log.read()
        assert process.returncode == 0, output
        assert "Traceback" not in output, output


def run_example(
    command: list[str], rpc_url: str, provider_url: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={
            **os.environ,
            "RPC_URL": rpc_url,
            "PROVIDER_URL": provider_url,
            "TOKEN": "demo-alice",
            **env,
        },
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


def result(rpc_url: str, method: str, params: Any, token: str = "demo-payments") -> Any:
    answer = rpc(rpc_url, method, params, token)
    assert "result" in answer, answer
    return answer["result"]


def bought_by_the_example(rpc_url: str, before: set[str]) -> dict[str, Any]:
    """The one purchase alice has now that she did not have before the example ran."""
    items = result(rpc_url, "purchase.list", {"limit": 100}, "demo-alice")["items"]
    (new,) = [item for item in items if item["purchase_id"] not in before]
    return dict(new)


def alice_purchases(rpc_url: str) -> set[str]:
    items = result(rpc_url, "purchase.list", {"limit": 100}, "demo-alice")["items"]
    return {item["purchase_id"] for item in items}


def assert_paid_once(rpc_url: str, purchase: dict[str, Any], source: str) -> None:
    """Fulfilled once, by a verified payment event that arrived through ``source``."""
    assert purchase["state"] == "fulfilled"
    events = result(rpc_url, "purchase.events", [purchase["purchase_id"]])
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "pending"),
        ("pending", "fulfilled"),
    ]
    assert events[-1]["source"] == source
    assert events[-1]["evidence"] == "payment_event"
    assert events[-1]["payment_ref"].startswith("pi_demo_")
    registrations = result(rpc_url, "registration.list", {}, "demo-alice")
    assert [r["purchase_id"] for r in registrations].count(purchase["purchase_id"]) == 1


def test_python_client_pays_through_the_provider(demo_env: dict[str, str], tmp_path: Path) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        before = alice_purchases(rpc_url)
        with running_provider(port) as provider:
            run = run_example(
                [sys.executable, str(EXAMPLES / "python_client.py")], rpc_url, provider
            )
        assert run.returncode == 0, run.stdout + run.stderr
        # The provider's webhook got there first; the client's proof then repeated.
        assert_paid_once(rpc_url, bought_by_the_example(rpc_url, before), "webhook")
    assert "error: code=402 message=Payment not verified: " in run.stdout
    assert 'data={"reason": "missing"}' in run.stdout
    assert '"status": "applied"' in run.stdout  # the webhook's answer, shown
    assert "purchase.fulfill again: identical answer" in run.stdout
    assert f"redirect_url: {FRONTEND_URL}/courses/python-basics/start" in run.stdout
    assert "None -> pending by rpc (None)" in run.stdout
    assert "pending -> fulfilled by webhook (payment_event) payment_ref=pi_demo_" in run.stdout
    assert "batch missing: error 404" in run.stdout
    assert "error: code=409 message=A fulfilled purchase cannot become canceled" in run.stdout
    assert "error: code=409 message=You are already registered for this course" in run.stdout
    assert run.stdout.rstrip().endswith("all calls answered as expected")


def test_python_client_exits_non_zero_when_there_is_nothing_left_to_buy(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        with running_provider(port) as provider:
            command = [sys.executable, str(EXAMPLES / "python_client.py")]
            runs = [run_example(command, rpc_url, provider) for _ in range(3)]
    # Alice starts registered for one course of three: two runs buy the other two.
    assert [run.returncode for run in runs] == [0, 0, 1], [run.stderr for run in runs]
    assert "registered for every course already" in runs[2].stderr
    assert "rpc-server create-token" in runs[2].stderr


def test_node_client_pays_with_the_proof_alone(demo_env: dict[str, str], tmp_path: Path) -> None:
    node = require_node("the Node.js example (examples/node_client.mjs)")
    install_node_dependencies()
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        before = alice_purchases(rpc_url)
        # No webhook this time: the proof the client hands on is what fulfils.
        with running_provider(port, webhook=False) as provider:
            run = run_example([node, str(EXAMPLES / "node_client.mjs")], rpc_url, provider)
        assert run.returncode == 0, run.stdout + run.stderr
        assert_paid_once(rpc_url, bought_by_the_example(rpc_url, before), "rpc")
    assert "error: code=402 message=Payment not verified: " in run.stdout
    assert 'data={"reason":"missing"}' in run.stdout
    assert "purchase.fulfill again: identical answer" in run.stdout
    assert f"fulfilled {FRONTEND_URL}/courses/python-basics/start" in run.stdout
    assert "pending -> fulfilled by rpc (payment_event) payment_ref=pi_demo_" in run.stdout
    assert "batch missing: error 404" in run.stdout
    assert "error: code=409 message=You are already registered for this course" in run.stdout
    assert run.stdout.rstrip().endswith("all calls answered as expected")


def test_curl_example_pays_through_the_provider(demo_env: dict[str, str], tmp_path: Path) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        before = alice_purchases(rpc_url)
        with running_provider(port) as provider:
            run = run_example([str(EXAMPLES / "curl.sh")], rpc_url, provider)
        assert run.returncode == 0, run.stdout + run.stderr
        assert_paid_once(rpc_url, bought_by_the_example(rpc_url, before), "webhook")
    assert '"code":402' in run.stdout and '"reason":"missing"' in run.stdout
    assert "(identical)" in run.stdout
    assert "HTTP 500" not in run.stderr


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def preflight(url: str, origin: str) -> dict[str, str]:
    request = urllib.request.Request(
        url,
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(response.headers)
    except urllib.error.HTTPError as error:
        return dict(error.headers)


def test_payment_provider_charges_what_the_shop_stores_and_signs_one_event(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        # The demo data gives bob one pending purchase of sql-fundamentals (39.50 EUR).
        (bobs,) = result(rpc_url, "purchase.list", {}, "demo-bob")["items"]
        with running_provider(port, cors_origin="http://shop.test:8000") as provider:
            status, paid = post_json(f"{provider}/pay", {"purchase_id": bobs["purchase_id"]})
            assert status == 200, paid
            proof = paid["payment_proof"]
            payload = proof["payload"]
            # A Standard Webhooks event, signed with the demo key (checked by the library).
            headers = {
                "webhook-id": proof["id"],
                "webhook-timestamp": str(proof["timestamp"]),
                "webhook-signature": proof["signature"],
            }
            assert Webhook(DEMO_PAYMENT_KEY).verify(payload, headers) == {
                "type": "payment.succeeded",
                "data": {
                    "purchase_id": bobs["purchase_id"],
                    "amount": "39.50",
                    "currency": "EUR",
                    "payment_ref": json.loads(payload)["data"]["payment_ref"],
                },
            }
            assert abs(proof["timestamp"] - datetime.now(UTC).timestamp()) < 60
            assert paid["webhook"]["answer"] == {
                "status": "applied", "purchase_id": bobs["purchase_id"], "state": "fulfilled"
            }  # fmt: skip
            # Bob hands the same event on: it repeats what the webhook did.
            fulfilled = rpc(
                rpc_url,
                "purchase.fulfill",
                {"purchase_id": bobs["purchase_id"], "purchase_state": "fulfilled",
                 "payment_proof": proof},
                "demo-bob",
            )["result"]  # fmt: skip
            assert fulfilled["purchase"]["state"] == "fulfilled"

            # Nothing is left to pay for a fulfilled purchase; unknown ones are not found.
            status, again = post_json(f"{provider}/pay", {"purchase_id": bobs["purchase_id"]})
            assert status == 409
            assert again == {
                "error": f"purchase {bobs['purchase_id']} is fulfilled: there is nothing to pay"
            }
            assert post_json(f"{provider}/pay", {"purchase_id": "0" * 32})[0] == 404
            assert post_json(f"{provider}/pay", {"course": "x"})[0] == 400

            # Declines: the fail flag, and the declined test card.
            alice_course = {"course": "python-basics"}
            for decline in ({"fail": True}, {"card": "4000 0000 0000 0002"}):
                created = result(rpc_url, "purchase.create", alice_course, "demo-alice")
                status, declined = post_json(
                    f"{provider}/pay", {"purchase_id": created["purchase_id"], **decline}
                )
                assert status == 200, declined
                event = json.loads(declined["payment_proof"]["payload"])
                assert event["type"] == declined["type"] == "payment.failed"
                assert event["data"]["error_message"] == "Your card was declined."
                assert declined["webhook"]["answer"]["state"] == "failed"
                got = result(rpc_url, "purchase.get", [created["purchase_id"]], "demo-alice")
                assert (got["state"], got["error_msg"]) == ("failed", "Your card was declined.")

            # CORS: the configured browser origin may call /pay; another may not.
            allowed = preflight(f"{provider}/pay", "http://shop.test:8000")
            assert allowed.get("Access-Control-Allow-Origin") == "http://shop.test:8000"
            assert "Access-Control-Allow-Origin" not in preflight(
                f"{provider}/pay", "http://evil.test"
            )


class QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class FrontendSite:
    """Where the example page is served from (a folder of the test's own) and its origin."""

    directory: Path
    origin: str

    def deploy(self, rpc_url: str, provider: str) -> None:
        """Put examples/frontend/index.html there, configured as a deployment would be:
        its two <meta> addresses set to this test's server and provider."""
        page = (EXAMPLES / "frontend" / "index.html").read_text()
        for name, value in (("rpc-endpoint", rpc_url), ("payment-provider", provider)):
            page, count = re.subn(
                rf'<meta name="{name}" content="[^"]*">',
                f'<meta name="{name}" content="{value}">',
                page,
            )
            assert count == 1, name
        (self.directory / "index.html").write_text(page)


@pytest.fixture
def frontend_site(tmp_path: Path) -> Iterator[FrontendSite]:
    """Serve a folder over HTTP on a free port, for the example page."""
    directory = tmp_path / "site"
    directory.mkdir()
    handler = partial(QuietFileHandler, directory=str(directory))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, name="frontend", daemon=True)
        thread.start()
        try:
            yield FrontendSite(directory, f"http://127.0.0.1:{server.server_address[1]}")
        finally:
            server.shutdown()
            thread.join(timeout=10)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def test_frontend_pays_then_fulfils_with_one_batch_through_cors(
    demo_env: dict[str, str], frontend_site: FrontendSite, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        reason = (
            f"Chromium is missing at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (.ci/run does this) to run the browser test"
        )
        # In CI the browser test must run; on a developer's machine say what is missing.
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    frontend_origin = frontend_site.origin
    env = {**demo_env, "RPC_SERVER_CORS_ORIGINS": frontend_origin}
    with (
        running_server(env, cwd=tmp_path) as (port, _),
        running_provider(port, cors_origin=frontend_origin) as provider,
    ):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        listed = result(rpc_url, "purchase.list", {}, "demo-alice")["items"]
        # The demo data gives alice one pending purchase and one fulfilled one.
        (pending,) = [item for item in listed if item["state"] == "pending"]
        purchase_id = pending["purchase_id"]
        frontend_site.deploy(rpc_url, provider)
        # The old way to preset the page, and what an attacker's link would carry: an
        # endpoint of theirs and a token. The page uses neither and drops them from the URL.
        evil = "http://evil.test:9/rpc"
        query = urlencode({"rpc": evil, "token": "demo-alice", "provider": evil})

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page_errors: list[str] = []
                page.on("pageerror", lambda error: page_errors.append(str(error)))
                contacted: list[str] = []
                page.on("request", lambda sent: contacted.append(sent.url))
                page.goto(f"{frontend_origin}/index.html?{query}")

                expect(page.locator("#status")).to_have_text(
                    "Enter a token to load your purchases."
                )
                assert page.url == f"{frontend_origin}/index.html"
                expect(page.locator("#token")).to_have_value("")
                expect(page.locator("#token")).to_have_attribute("type", "password")
                expect(page.locator("#rpc-url")).to_have_text(rpc_url)
                page.fill("#token", "demo-alice")
                page.click("#load")

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
                row.locator('button[data-action="pay"]').click()

                outcome = page.locator("#outcome")
                expect(outcome).to_be_visible()
                expect(outcome).to_have_attribute("data-state", "fulfilled")
                expect(row).to_have_attribute("data-state", "fulfilled")
                expect(row.locator('[data-field="state"]')).to_have_text("fulfilled")
                expect(row.locator('button[data-action="pay"]')).to_have_count(0)
                expect(page.locator("#redirect-url")).to_have_text(
                    f"{FRONTEND_URL}/courses/{pending['course']}/start"
                )
                expect(page.locator("#redirect-url")).to_have_attribute(
                    "href", f"{FRONTEND_URL}/courses/{pending['course']}/start"
                )
                # One POST to the provider, then ONE POST carrying the whole batch: the
                # fulfillment with the provider's proof and the refreshed list.
                assert [sent.url for sent in posts] == [f"{provider}/pay", rpc_url]
                assert posts[0].post_data_json == {"purchase_id": purchase_id, "fail": False}
                provider_answer = posts[0].response()
                assert provider_answer is not None
                proof = provider_answer.json()["payment_proof"]
                batch = posts[1].post_data_json
                assert [item["method"] for item in batch] == ["purchase.fulfill", "purchase.list"]
                assert batch[0]["params"] == {
                    "purchase_id": purchase_id,
                    "purchase_state": "fulfilled",
                    "payment_proof": proof,
                }

                # A declined card: a new purchase, paid with the test card that fails.
                posts.clear()
                page.select_option("#course", "sql-fundamentals")
                page.click("#create")
                expect(rows).to_have_count(len(listed) + 1)
                new_row = table.locator("tbody tr[data-state=pending]")
                expect(new_row).to_have_count(1)
                declined_id = new_row.get_attribute("data-purchase-id")
                assert declined_id and declined_id != purchase_id
                page.check("#decline")
                new_row.locator('button[data-action="pay"]').click()
                expect(outcome).to_have_attribute("data-state", "failed")
                expect(outcome).to_have_attribute("data-purchase-id", declined_id)
                expect(page.locator("#outcome-error")).to_have_text(": Your card was declined.")
                expect(page.locator("#redirect-url")).to_have_text(
                    f"{FRONTEND_URL}/checkout/{declined_id}"
                )
                declined_row = table.locator(f'tr[data-purchase-id="{declined_id}"]')
                expect(declined_row.locator('[data-field="state"]')).to_have_text("failed")

                # The token stays in this tab's sessionStorage (a reload keeps it), never
                # in localStorage or the URL; "Forget token" removes it.
                storage = "[JSON.stringify(sessionStorage), JSON.stringify(localStorage)]"
                kept, persistent = page.evaluate(storage)
                assert "demo-alice" in kept and "demo-alice" not in persistent
                page.reload()
                expect(page.locator("#token")).to_have_value("demo-alice")
                expect(table).to_have_attribute("data-count", str(len(listed) + 1))
                page.click("#forget")
                assert "demo-alice" not in page.evaluate("JSON.stringify(sessionStorage)")
                # (The first request is the test's own navigation to the link above.)
                assert all("demo-alice" not in url for url in contacted[1:]), contacted
                # Nothing but the page's own origin and its two configured addresses.
                allowed = {frontend_origin, origin_of(rpc_url), origin_of(provider)}
                assert {origin_of(url) for url in contacted} <= allowed, contacted
                assert page_errors == []
            finally:
                browser.close()

        paid = result(rpc_url, "purchase.get", [purchase_id], "demo-alice")
        assert_paid_once(rpc_url, paid, "webhook")
        declined = result(rpc_url, "purchase.get", [declined_id], "demo-alice")
        assert (declined["state"], declined["error_msg"]) == ("failed", "Your card was declined.")
