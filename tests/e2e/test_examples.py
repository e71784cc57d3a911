"""The examples in ``examples/`` run as users run them, against a real ``rpc-server serve``.

Each test seeds the demo data (``rpc-server seed-demo``) into a database of its own (on
each engine), starts the server on a free port (``tests.processes.running_server``) and
the example payment provider (``examples/payment_provider.py``, a real process, signing
with the public demo key the server accepts while the demo data is live), then runs one
example against them: curl.sh, the Python client, the Node.js client (skipped only where
``node`` is missing, outside CI), the live-updates client (examples/live_updates.py, over a
WebSocket, also across a cut connection) and the browser frontend in headless Chromium,
served over HTTP from an origin of its own, calling the server and the provider through
CORS and following the purchase over a WebSocket until the server pushes its fulfilment.
Chromium is Debian's (``.ci/run`` installs it); without it the browser test fails in CI
rather than skips, so CI can never pass without having run it.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import pytest
from playwright.sync_api import Request, WebSocket, expect, sync_playwright
from standardwebhooks import Webhook

from rpc_server.cli.demo import DEMO_PAYMENT_KEY
from tests.conftest import FRONTEND_URL
from tests.node_packages import EXAMPLES, in_ci, install_node_dependencies, require_node
from tests.processes import RPC_SERVER, free_port, running_server
from tests.tcp_proxy import TcpProxy

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
        bought = bought_by_the_example(rpc_url, before)
        assert_paid_once(rpc_url, bought, "rpc")
        created, fulfilled = result(rpc_url, "purchase.events", [bought["purchase_id"]])
    # Subscribed over the WebSocket from the creation's seq, and the fulfilment was pushed:
    # one notification, the fulfilment's own seq.
    assert f"live: subscribed to {bought['purchase_id']} since #{created['seq']}\n" in run.stdout
    pushed = re.findall(r"^live: purchase\.updated .*$", run.stdout, re.MULTILINE)
    assert pushed == [
        f"live: purchase.updated #{fulfilled['seq']} pending -> fulfilled by rpc (payment_event),"
        " purchase now fulfilled"
    ]
    assert f"live: fulfilled, pushed as #{fulfilled['seq']}\n" in run.stdout
    assert "error: code=402 message=Payment not verified: " in run.stdout
    assert 'data={"reason":"missing"}' in run.stdout
    assert "purchase.fulfill again: identical answer" in run.stdout
    assert f"fulfilled {FRONTEND_URL}/courses/python-basics/start" in run.stdout
    assert "pending -> fulfilled by rpc (payment_event) payment_ref=pi_demo_" in run.stdout
    assert "batch missing: error 404" in run.stdout
    assert "error: code=409 message=You are already registered for this course" in run.stdout
    assert run.stdout.rstrip().endswith("all calls answered as expected")


class OutputLines:
    """A running example's stdout, read line by line on a thread of its own, so that a test
    can wait (with a deadline) for a line while the example goes on running."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(
            target=self._read, args=(process.stdout,), name="example-output", daemon=True
        )
        self.reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        """The first line matching ``pattern`` (a regex, from the start of the line)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if found := re.match(pattern, line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or not self.reader.is_alive():
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.text()}")
                self.changed.wait(min(left, 0.5))

    def finish(self, timeout: float = 30) -> int:
        """Wait for the example to exit; its exit code."""
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(self.lines)


@contextmanager
def running_live_updates(
    rpc_url: str, *args: str, token: str = "demo-alice"
) -> Iterator[OutputLines]:
    """Run ``python examples/live_updates.py ARGS`` against ``rpc_url``; kill it if the test
    leaves it running."""
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "live_updates.py"), *args],
        env={**os.environ, "RPC_URL": rpc_url, "TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield OutputLines(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def update_line(event: dict[str, Any], state: str) -> str:
    """How examples/live_updates.py prints the notification of ``event``."""
    return (
        f"#{event['seq']} {event['purchase_id']} {event['from_state']} -> {event['to_state']} "
        f"by {event['source']} ({event['evidence']}) payment_ref={event['payment_ref']} "
        f"now {state}"
    )


def test_live_updates_prints_a_fulfilment_made_meanwhile(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        (pending,) = result(rpc_url, "purchase.list", {"state": "pending"}, "demo-alice")["items"]
        purchase_id = pending["purchase_id"]
        (created,) = result(rpc_url, "purchase.events", [purchase_id])
        until_fulfilled = ("--purchase-id", purchase_id, "--until-state", "fulfilled")
        with (
            running_provider(port) as provider,
            running_live_updates(rpc_url, *until_fulfilled, "--timeout", "30") as live,
        ):
            # It read the purchase's history and subscribed from its latest seq.
            live.wait_for(rf"purchase {purchase_id} is pending \(#{created['seq']}\)$")
            live.wait_for(rf"subscribed: \S+ to {purchase_id} since {created['seq']}$")
            # Meanwhile, the buyer pays: the provider's webhook fulfils the purchase.
            status, paid = post_json(f"{provider}/pay", {"purchase_id": purchase_id})
            assert status == 200, paid
            assert live.finish() == 0, live.text()
        events = result(rpc_url, "purchase.events", [purchase_id])
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "pending"),
        ("pending", "fulfilled"),
    ]
    fulfilment = events[-1]
    assert fulfilment["source"] == "webhook" and fulfilment["payment_ref"].startswith("pi_demo_")
    notifications = [line for line in live.lines if line.startswith("#")]
    assert notifications == [update_line(fulfilment, "fulfilled")]
    assert live.lines[-1] == f"done: 1 notification(s), last seq {fulfilment['seq']}"


@contextmanager
def cuttable_proxy(port: int) -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A TCP proxy to 127.0.0.1:``port`` on a thread of its own; yields its port and two
    functions: ``cut()`` closes every connection through it and refuses new ones,
    ``restore()`` listens again on the same port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="proxy", daemon=True)
    thread.start()
    proxy = TcpProxy("127.0.0.1", port)

    def run(coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=10)

    try:
        run(proxy.start())
        yield proxy.port, lambda: run(proxy.stop()), lambda: run(proxy.start())
    finally:
        run(proxy.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_live_updates_resume_after_a_cut_from_the_last_seq_seen(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with (
        running_server(demo_env, cwd=tmp_path) as (port, _),
        cuttable_proxy(port) as (proxy_port, cut, restore),
    ):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        python = {"course": "python-basics"}
        # Every purchase of alice's, live from now, through the proxy; it stops after three
        # notifications.
        through_proxy = f"http://127.0.0.1:{proxy_port}/rpc"
        with running_live_updates(through_proxy, "--count", "3", "--timeout", "30") as live:
            live.wait_for(r"subscribed: \S+ to all purchases in scope since now \(live only\)$")
            first = result(rpc_url, "purchase.create", python, "demo-alice")
            (created,) = result(rpc_url, "purchase.events", [first["purchase_id"]])
            live.wait_for(re.escape(update_line(created, "pending")) + "$")

            # The connection is cut; while it is down, two more changes commit.
            cut()
            live.wait_for(
                r"disconnected \(.*\); reconnecting in [0-9.]+ s, "
                rf"resuming after #{created['seq']}$"
            )
            cancel = [first["purchase_id"], "canceled"]
            canceled = result(rpc_url, "purchase.fulfill", cancel, "demo-alice")
            assert canceled["purchase"]["state"] == "canceled"
            second = result(rpc_url, "purchase.create", python, "demo-alice")
            restore()
            # It subscribed again from the last seq it printed, and got both, once each.
            live.wait_for(rf"subscribed: \S+ to all purchases in scope since {created['seq']}$")
            assert live.finish() == 0, live.text()
        (_, canceling) = result(rpc_url, "purchase.events", [first["purchase_id"]])
        (created_second,) = result(rpc_url, "purchase.events", [second["purchase_id"]])
    notifications = [line for line in live.lines if line.startswith("#")]
    assert notifications == [
        update_line(created, "pending"),
        update_line(canceling, "canceled"),
        update_line(created_second, "pending"),
    ], live.text()
    assert live.lines[-1] == f"done: 3 notification(s), last seq {created_second['seq']}"


def test_live_updates_exits_non_zero_when_refused_or_when_nothing_comes(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with running_server(demo_env, cwd=tmp_path) as (port, _):
        rpc_url = f"http://127.0.0.1:{port}/rpc"
        (pending,) = result(rpc_url, "purchase.list", {"state": "pending"}, "demo-alice")["items"]
        wait = ("--purchase-id", pending["purchase_id"], "--until-state", "fulfilled")
        # Nobody pays: it gives up after its timeout.
        with running_live_updates(rpc_url, *wait, "--timeout", "1") as waiting:
            assert waiting.finish() == 1, waiting.text()
        assert waiting.lines[-1] == "timed out after 1 s without reaching the end asked for"
        # A token the server does not know: the upgrade is refused, and it does not retry.
        with running_live_updates(rpc_url, *wait, token="not-a-token") as unknown:
            assert unknown.finish() == 1, unknown.text()
        assert unknown.lines == ["refused: the upgrade answered HTTP 401"]
        # Another buyer's purchase: not found (404), as over HTTP.
        with running_live_updates(rpc_url, *wait, token="demo-bob") as other:
            assert other.finish() == 1, other.text()
        assert other.lines[-1].startswith("refused: purchase.events: error 404 "), other.text()


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


@dataclass
class SocketFrames:
    """One WebSocket a page opened: its URL and the JSON frames it sent and received."""

    url: str
    sent: list[Any] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)


class WebSocketFrames:
    """Every WebSocket a page opens, frame by frame (playwright's ``websocket`` event)."""

    def __init__(self) -> None:
        self.sockets: list[SocketFrames] = []

    def watch(self, socket: WebSocket) -> None:
        frames = SocketFrames(socket.url)
        self.sockets.append(frames)
        socket.on("framesent", lambda payload: frames.sent.append(json.loads(payload)))
        socket.on("framereceived", lambda payload: frames.received.append(json.loads(payload)))


def method_names(body: Any) -> list[str]:
    """The methods a JSON-RPC request or batch calls."""
    return [item["method"] for item in (body if isinstance(body, list) else [body])]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def test_frontend_pays_then_waits_for_the_pushed_fulfilment_over_a_websocket(
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
        (created,) = result(rpc_url, "purchase.events", [purchase_id])
        course_start = f"{FRONTEND_URL}/courses/{pending['course']}/start"
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
                sockets = WebSocketFrames()
                page.on("websocket", sockets.watch)
                # The shop's frontend, where a fulfilled purchase continues (no such host:
                # the browser is answered here).
                page.route(f"{FRONTEND_URL}/**", lambda route: route.fulfill(
                    content_type="text/html", body="<title>Your course</title>Welcome"
                ))  # fmt: skip
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

                # The server pushed the fulfilment and the page continued to the course.
                page.wait_for_url(course_start, timeout=20_000)
                expect(page).to_have_title("Your course")
                fulfilment = result(rpc_url, "purchase.events", [purchase_id])[-1]
                assert fulfilment["to_state"] == "fulfilled"

                # Over plain HTTP: the seq it starts from (read before paying), the payment
                # at the provider, and the proof handed on.
                assert [sent.url for sent in posts] == [rpc_url, f"{provider}/pay", rpc_url]
                events_call = posts[0].post_data_json
                assert (events_call["method"], events_call["params"]) == (
                    "purchase.events", {"purchase_id": purchase_id}
                )  # fmt: skip
                assert posts[1].post_data_json == {"purchase_id": purchase_id, "fail": False}
                fulfill_call = posts[2].post_data_json
                assert fulfill_call["method"] == "purchase.fulfill"
                proof = fulfill_call["params"]["payment_proof"]
                assert fulfill_call["params"] == {
                    "purchase_id": purchase_id,
                    "purchase_state": "fulfilled",
                    "payment_proof": proof,
                }
                # The proof is the provider's signed event, the one that fulfilled (by its
                # webhook); the page cannot have made it up. (Its answer's body is gone with
                # the navigation.)
                signed = Webhook(DEMO_PAYMENT_KEY).verify(proof["payload"], {
                    "webhook-id": proof["id"],
                    "webhook-timestamp": str(proof["timestamp"]),
                    "webhook-signature": proof["signature"],
                })  # fmt: skip
                assert signed["data"]["payment_ref"] == fulfilment["payment_ref"]
                # Over one WebSocket to the endpoint, with no token in its URL: authenticate,
                # subscribe from the creation's seq, and one notification: the fulfilment.
                ws_url = f"ws://127.0.0.1:{port}/rpc"
                (socket,) = sockets.sockets
                assert socket.url == ws_url
                assert [(f["method"], f["params"]) for f in socket.sent] == [
                    ("rpc.authenticate", {"token": "demo-alice"}),
                    ("purchase.subscribe", {"purchase_id": purchase_id, "since": created["seq"]}),
                ]
                answers = {f["id"]: f for f in socket.received if "id" in f}
                authenticated, subscribed = (answers[f["id"]] for f in socket.sent)
                assert authenticated["result"] == {"user": "alice@example.com", "scope": "buyer"}
                notifications = [f for f in socket.received if "method" in f]
                assert [f["method"] for f in notifications] == ["purchase.updated"]
                pushed = notifications[0]["params"]
                assert pushed["subscription"] == subscribed["result"]
                assert pushed["result"]["seq"] == fulfilment["seq"]
                assert pushed["result"]["event"] == fulfilment
                assert pushed["result"]["purchase"]["state"] == "fulfilled"
                assert pushed["result"]["purchase"]["purchase_id"] == purchase_id
                # Pushed, never polled: no purchase.get at all, over HTTP or the socket.
                called = [f["method"] for f in socket.sent]
                for sent in posts:
                    if sent.url == rpc_url:
                        called += method_names(sent.post_data_json)
                assert called.count("purchase.get") == 0, called

                # Back on the page (the token is still in this tab): the purchase is paid.
                page.goto(f"{frontend_origin}/index.html")
                expect(rows).to_have_count(len(listed))
                expect(row).to_have_attribute("data-state", "fulfilled")
                expect(row.locator('button[data-action="pay"]')).to_have_count(0)

                # A declined card: a new purchase, paid with the test card that fails. The
                # page stays, shows the failure as the server pushes it, and links to checkout.
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
                outcome = page.locator("#outcome")
                expect(outcome).to_have_attribute("data-state", "failed")
                expect(outcome).to_have_attribute("data-purchase-id", declined_id)
                expect(page.locator("#outcome-error")).to_have_text(": Your card was declined.")
                expect(page.locator("#redirect-url")).to_have_text(
                    f"{FRONTEND_URL}/checkout/{declined_id}"
                )
                declined_row = table.locator(f'tr[data-purchase-id="{declined_id}"]')
                expect(declined_row.locator('[data-field="state"]')).to_have_text("failed")
                declined_change = result(rpc_url, "purchase.events", [declined_id])[-1]
                (logged,) = page.locator("#live-log li").all()
                expect(logged).to_have_attribute("data-seq", str(declined_change["seq"]))
                expect(logged).to_have_attribute("data-state", "failed")
                expect(logged).to_contain_text("pending → failed (webhook, payment_event)")
                assert page.url == f"{frontend_origin}/index.html"
                assert len(sockets.sockets) == 2

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
                # Nothing but the page's own origin, its two configured addresses and the
                # shop's frontend it sent the buyer to.
                allowed = {
                    frontend_origin, origin_of(rpc_url), origin_of(provider), FRONTEND_URL
                }  # fmt: skip
                assert {origin_of(url) for url in contacted} <= allowed, contacted
                assert page_errors == []
            finally:
                browser.close()

        paid = result(rpc_url, "purchase.get", [purchase_id], "demo-alice")
        assert_paid_once(rpc_url, paid, "webhook")
        declined = result(rpc_url, "purchase.get", [declined_id], "demo-alice")
        assert (declined["state"], declined["error_msg"]) == ("failed", "Your card was declined.")
