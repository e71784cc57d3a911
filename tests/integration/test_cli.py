"""The ``rpc-server`` console script, run as a user runs it: a real process, a real file.

The commands that work on a database run on each engine (``database_url``); what they
wrote is checked through the services (``services.authenticate``), with SQL, or over
HTTP with the app on the same database.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from rpc_server.cli.demo import DEMO_PAYMENT_KEY
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.states import Scope
from tests.conftest import RpcCall, World
from tests.payments import OTHER_PAYMENT_KEY, TEST_PAYMENT_KEY, proof_for
from tests.processes import running_server, wait_until_healthy

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
    # No payment key and no demo override unless a test sets one.
    monkeypatch.delenv("RPC_SERVER_PAYMENT_KEYS", raising=False)
    monkeypatch.delenv("RPC_SERVER_ALLOW_DEMO", raising=False)
    return tmp_path


@pytest.fixture
def db_env(database_url: str, workdir: Path) -> dict[str, str]:
    """Settings for commands on this test's migrated database (one per engine)."""
    return {"RPC_SERVER_DATABASE_URL": database_url, "RPC_SERVER_MAIL_DIR": str(workdir / "mail")}


async def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``run`` from a test on the event loop (which serves the app meanwhile)."""
    return await asyncio.to_thread(run, *args, cwd=cwd, env=env)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


async def count(engine: AsyncEngine, sql: str, **params: Any) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(sql), params)).scalar_one())


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
        # curl.sh, paying with `rpc-server sign-payment` (the server's settings, here).
        example = subprocess.run(
            [str(EXAMPLES / "curl.sh")],
            cwd=workdir,
            env={
                **os.environ,
                "RPC_URL": f"http://127.0.0.1:{port}/rpc",
                "PAY_WITH": "sign-payment",
                "PATH": f"{Path(RPC_SERVER).parent}{os.pathsep}{os.environ['PATH']}",
            },
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
    assert '"code":402' in example.stdout and '"reason":"missing"' in example.stdout
    assert "(identical)" in example.stdout
    assert '"source":"rpc","evidence":"payment_event","payment_ref":"manual_' in example.stdout
    assert "HTTP 500" not in example.stderr
    # The demo key, used with no set-up, and said so.
    assert "verified with the public demo key" in output


@pytest.mark.parametrize(
    ("flags", "scope"),
    [
        ((), Scope.BUYER),
        (("--scope", "buyer"), Scope.BUYER),
        (("--scope", "staff"), Scope.STAFF),
        (("--staff",), Scope.STAFF),
        (("--staff", "--scope", "staff"), Scope.STAFF),
        (("--scope", "payments"), Scope.PAYMENTS),
    ],
    ids=["default", "buyer", "staff", "--staff", "--staff-and-scope-staff", "payments"],
)
async def test_create_token_issues_a_token_of_the_scope_asked_for(
    flags: tuple[str, ...],
    scope: Scope,
    db_env: dict[str, str],
    workdir: Path,
    uow_factory: SqlUnitOfWorkFactory,
) -> None:
    result = await cli("create-token", "carol@example.com", *flags, cwd=workdir, env=db_env)
    assert result.returncode == 0, result.stderr
    assert f"new {scope.value} token for carol@example.com" in result.stdout
    actor = await services.authenticate(uow_factory, last_line(result))
    assert actor is not None
    assert (actor.email, actor.scope) == ("carol@example.com", scope)


async def test_tokens_of_each_scope_do_what_their_scope_allows_over_http(
    db_env: dict[str, str], workdir: Path, rpc: RpcCall, world: World
) -> None:
    tokens = {}
    for email, scope in (("dan@example.com", "buyer"), ("desk@example.com", "staff"),
                         ("psp@example.com", "payments")):  # fmt: skip
        result = await cli("create-token", email, "--scope", scope, cwd=workdir, env=db_env)
        assert result.returncode == 0, result.stderr
        tokens[scope] = last_line(result)
    created = await rpc("purchase.create", {"course": "python-basics"}, token=tokens["buyer"])
    purchase_id = created["result"]["purchase_id"]
    fulfill = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    # The buyer's token may not fulfil on its word; staff see every purchase; the
    # payments token speaks for the provider.
    refused = await rpc("purchase.fulfill", fulfill, token=tokens["buyer"])
    assert refused["error"]["code"] == 402
    listed = await rpc("purchase.list", {"limit": 100}, token=tokens["staff"])
    assert purchase_id in {item["purchase_id"] for item in listed["result"]["items"]}
    fulfilled = await rpc("purchase.fulfill", fulfill, token=tokens["payments"])
    assert fulfilled["result"]["purchase"]["state"] == "fulfilled"
    events = await rpc("purchase.events", [purchase_id], token=tokens["buyer"])
    assert events["result"][-1]["actor_scope"] == "payments"
    assert events["result"][-1]["evidence"] == "payments_scope"


@pytest.mark.parametrize(
    "flags", [("--staff", "--scope", "buyer"), ("--scope", "payments", "--staff")]
)
async def test_staff_with_another_scope_exits_2_and_creates_nothing(
    flags: tuple[str, ...], db_env: dict[str, str], workdir: Path, engine: AsyncEngine
) -> None:
    result = await cli("create-token", "carol@example.com", *flags, cwd=workdir, env=db_env)
    assert result.returncode == 2
    assert "--staff means --scope staff" in result.stderr
    assert "rpcs_" not in result.stdout
    assert await count(engine, "SELECT count(*) FROM api_tokens") == 0
    assert await count(engine, "SELECT count(*) FROM users") == 0


async def test_a_buyer_token_for_a_staff_user_does_not_demote_their_staff_token(
    db_env: dict[str, str],
    workdir: Path,
    uow_factory: SqlUnitOfWorkFactory,
    engine: AsyncEngine,
) -> None:
    staff = await cli("create-token", "desk@example.com", "--staff", cwd=workdir, env=db_env)
    buyer = await cli("create-token", "desk@example.com", cwd=workdir, env=db_env)
    assert staff.returncode == buyer.returncode == 0, staff.stderr + buyer.stderr
    staff_actor = await services.authenticate(uow_factory, last_line(staff))
    buyer_actor = await services.authenticate(uow_factory, last_line(buyer))
    assert staff_actor is not None and buyer_actor is not None
    assert staff_actor.scope is Scope.STAFF and staff_actor.is_staff
    assert buyer_actor.scope is Scope.BUYER and not buyer_actor.is_staff
    assert staff_actor.user_id == buyer_actor.user_id
    # Nor is the user's role changed.
    staff_users = "SELECT count(*) FROM users WHERE email = :email AND is_staff"
    assert await count(engine, staff_users, email="desk@example.com") == 1


def payment_event(proof: dict[str, Any], key: str) -> Any:
    """The payload of a proof, after checking its signature with the reference library."""
    headers = {
        "webhook-id": proof["id"],
        "webhook-timestamp": str(proof["timestamp"]),
        "webhook-signature": proof["signature"],
    }
    return Webhook(key).verify(proof["payload"], headers)


async def test_sign_payment_prints_a_proof_that_purchase_fulfill_accepts(
    db_env: dict[str, str], workdir: Path, rpc: RpcCall, world: World
) -> None:
    created = await rpc("purchase.create", {"course": "sql-fundamentals"}, token=world.alice.token)
    purchase_id = created["result"]["purchase_id"]
    env = {**db_env, "RPC_SERVER_PAYMENT_KEYS": f"{TEST_PAYMENT_KEY},{OTHER_PAYMENT_KEY}"}
    signed = await cli("sign-payment", purchase_id, "--ref", "pi_cli_1", cwd=workdir, env=env)
    assert signed.returncode == 0, signed.stderr
    assert len(signed.stdout.strip().splitlines()) == 1
    proof = json.loads(signed.stdout)
    assert set(proof) == {"id", "timestamp", "signature", "payload"}
    # Signed with the first key configured; amount and currency as the database has them.
    assert payment_event(proof, TEST_PAYMENT_KEY) == {
        "type": "payment.succeeded",
        "data": {"purchase_id": purchase_id, "amount": "39.50", "currency": "EUR",
                 "payment_ref": "pi_cli_1"},
    }  # fmt: skip
    assert abs(proof["timestamp"] - time.time()) < 60

    params = {"purchase_id": purchase_id, "purchase_state": "fulfilled", "payment_proof": proof}
    fulfilled = await rpc("purchase.fulfill", params, token=world.alice.token)
    assert fulfilled["result"]["purchase"]["state"] == "fulfilled", fulfilled
    events = (await rpc("purchase.events", [purchase_id], token=world.alice.token))["result"]
    assert [(e["to_state"], e["source"], e["evidence"], e["payment_ref"]) for e in events] == [
        ("pending", "rpc", None, None),
        ("fulfilled", "rpc", "payment_event", "pi_cli_1"),
    ]


async def test_sign_payment_failed_prints_a_proof_that_records_failed(
    db_env: dict[str, str], workdir: Path, rpc: RpcCall, world: World
) -> None:
    created = await rpc("purchase.create", {"course": "python-basics"}, token=world.alice.token)
    purchase_id = created["result"]["purchase_id"]
    env = {**db_env, "RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY}
    message = "Card declined by the issuing bank"
    signed = await cli("sign-payment", purchase_id, "--failed", message, cwd=workdir, env=env)
    assert signed.returncode == 0, signed.stderr
    proof = json.loads(signed.stdout)
    event = payment_event(proof, TEST_PAYMENT_KEY)
    assert event["type"] == "payment.failed"
    assert event["data"]["error_message"] == message
    assert event["data"]["payment_ref"].startswith("manual_")  # no --ref: a random one

    params = {"purchase_id": purchase_id, "purchase_state": "failed", "error_msg": message,
              "payment_proof": proof}  # fmt: skip
    failed = await rpc("purchase.fulfill", params, token=world.alice.token)
    assert failed["result"]["purchase"]["state"] == "failed", failed
    assert failed["result"]["purchase"]["error_msg"] == message
    events = (await rpc("purchase.events", [purchase_id], token=world.alice.token))["result"]
    assert (events[-1]["to_state"], events[-1]["evidence"]) == ("failed", "payment_event")


async def test_sign_payment_without_a_key_exits_2(
    db_env: dict[str, str], workdir: Path, rpc: RpcCall, world: World
) -> None:
    created = await rpc("purchase.create", {"course": "python-basics"}, token=world.alice.token)
    # No RPC_SERVER_PAYMENT_KEYS and no demo data: there is nothing to sign with.
    signed = await cli("sign-payment", created["result"]["purchase_id"], cwd=workdir, env=db_env)
    assert signed.returncode == 2
    assert "no payment key" in signed.stderr
    assert signed.stdout == ""


async def test_sign_payment_for_an_unknown_purchase_exits_1(
    db_env: dict[str, str], workdir: Path
) -> None:
    env = {**db_env, "RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY}
    signed = await cli("sign-payment", "0" * 32, cwd=workdir, env=env)
    assert signed.returncode == 1
    assert f"no purchase {'0' * 32}" in signed.stderr
    assert signed.stdout == ""


async def test_seed_demo_creates_the_demo_payments_token_once(
    db_env: dict[str, str], workdir: Path, uow_factory: SqlUnitOfWorkFactory
) -> None:
    first = await cli("seed-demo", cwd=workdir, env=db_env)
    second = await cli("seed-demo", cwd=workdir, env=db_env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "payments@example.com (payments): demo-payments" in first.stdout
    assert "public demo key" in first.stdout  # no RPC_SERVER_PAYMENT_KEYS: it says so
    expected = {
        "demo-alice": ("alice@example.com", Scope.BUYER),
        "demo-bob": ("bob@example.com", Scope.BUYER),
        "demo-support": ("support@example.com", Scope.STAFF),
        "demo-payments": ("payments@example.com", Scope.PAYMENTS),
    }
    for token, (email, scope) in expected.items():
        actor = await services.authenticate(uow_factory, token)
        assert actor is not None, token
        assert (actor.email, actor.scope) == (email, scope)
    payments = await services.authenticate(uow_factory, "demo-payments")
    assert payments is not None and payments.sees_every_purchase


def wait_for_exit(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output


@pytest.mark.parametrize(
    ("seed", "env"),
    [(True, {}), (False, {"RPC_SERVER_PAYMENT_KEYS": DEMO_PAYMENT_KEY})],
    ids=["demo-tokens", "demo-key"],
)
def test_serve_refuses_a_non_loopback_host_while_demo_data_is_live(
    seed: bool, env: dict[str, str], db_env: dict[str, str], workdir: Path
) -> None:
    env = {**db_env, **env}
    if seed:
        assert run("seed-demo", cwd=workdir, env=env).returncode == 0
    refused = run("serve", "--host", "0.0.0.0", "--port", str(free_port()), cwd=workdir, env=env)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0" in refused.stderr
    assert "--allow-demo" in refused.stderr
    assert "JSON-RPC 2.0 endpoint" not in refused.stdout
    # On loopback the same data is no danger: it starts.
    port = free_port()
    server = subprocess.Popen(
        [RPC_SERVER, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until_healthy(port, server)
    finally:
        output = wait_for_exit(server)
    assert server.returncode == 0, output


@pytest.mark.parametrize(
    ("flags", "env", "seed"),
    [
        (("--allow-demo",), {}, True),
        ((), {"RPC_SERVER_ALLOW_DEMO": "true"}, True),
        ((), {"RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY}, False),
    ],
    ids=["--allow-demo", "RPC_SERVER_ALLOW_DEMO", "no-demo-data"],
)
def test_serve_on_a_non_loopback_host_starts_when_allowed_or_without_demo_data(
    flags: tuple[str, ...],
    env: dict[str, str],
    seed: bool,
    db_env: dict[str, str],
    workdir: Path,
) -> None:
    env = {**db_env, **env}
    if seed:
        assert run("seed-demo", cwd=workdir, env=env).returncode == 0
    port = free_port()
    server = subprocess.Popen(
        [RPC_SERVER, "serve", "--host", "0.0.0.0", "--port", str(port), *flags],
        cwd=workdir, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until_healthy(port, server)  # it answers: stop it at once
    finally:
        output = wait_for_exit(server)
    assert server.returncode == 0, output
    assert f"JSON-RPC 2.0 endpoint: POST http://0.0.0.0:{port}/rpc" in output
    assert ("public demo key" in output) is seed


def fulfil_over_http(port: int, purchase: dict[str, Any], key: str) -> Any:
    params = {"purchase_id": purchase["purchase_id"], "purchase_state": "fulfilled",
              "payment_proof": proof_for(purchase, key=key)}  # fmt: skip
    body = {"jsonrpc": "2.0", "method": "purchase.fulfill", "params": params, "id": 1}
    return post(port, body, "demo-alice")


def test_serve_after_seed_demo_verifies_proofs_signed_with_the_demo_key(
    db_env: dict[str, str], workdir: Path
) -> None:
    env = {**db_env, "RPC_SERVER_PAYMENT_KEYS": ""}  # unset: nothing configured
    assert run("seed-demo", cwd=workdir, env=env).returncode == 0
    output: list[str] = []
    with running_server(env, cwd=workdir, output=output) as (port, _):
        listed = post(port, {"jsonrpc": "2.0", "method": "purchase.list", "id": 1}, "demo-alice")
        (pending,) = [p for p in listed["result"]["items"] if p["state"] == "pending"]  # type: ignore[index]
        # Another key's signature is refused: the demo key is the one in use, not "any".
        refused = fulfil_over_http(port, pending, OTHER_PAYMENT_KEY)
        assert refused["error"]["code"] == 402, refused  # type: ignore[index]
        assert refused["error"]["data"] == {"reason": "invalid_signature"}  # type: ignore[index]
        fulfilled = fulfil_over_http(port, pending, DEMO_PAYMENT_KEY)
        assert fulfilled["result"]["purchase"]["state"] == "fulfilled", fulfilled  # type: ignore[index]
    assert "verified with the public demo key" in output[0]


# --- token lifetimes ----------------------------------------------------------------------


async def stored_expiry(engine: AsyncEngine) -> datetime | None:
    """The expiry of the only token in the database."""
    async with engine.connect() as connection:
        value = (await connection.execute(text("SELECT expires_at FROM api_tokens"))).scalar_one()
    if value is None:
        return None
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("flags", "ttl", "days"),
    [
        ((), None, 90.0),  # RPC_SERVER_TOKEN_TTL unset: 90 days
        ((), "7", 7.0),
        ((), "never", None),
        (("--expires-in", "2"), None, 2.0),
        (("--expires-in", "0.5"), "never", 0.5),  # the flag overrides the setting
        (("--expires-in", "never"), None, None),
        (("--expires-in", "NEVER"), "30", None),
    ],
    ids=["default", "ttl-7", "ttl-never", "flag-2", "flag-over-never", "flag-never", "NEVER"],
)
async def test_create_token_expires_by_default_and_prints_when(
    flags: tuple[str, ...],
    ttl: str | None,
    days: float | None,
    db_env: dict[str, str],
    workdir: Path,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RPC_SERVER_TOKEN_TTL", raising=False)
    env = db_env if ttl is None else {**db_env, "RPC_SERVER_TOKEN_TTL": ttl}
    before = datetime.now(UTC)
    result = await cli("create-token", "carol@example.com", *flags, cwd=workdir, env=env)
    after = datetime.now(UTC)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    expires_at = await stored_expiry(engine)
    token = last_line(result)

    async def works_at(moment: datetime) -> bool:
        return await services.authenticate(uow_factory, token, clock=lambda: moment) is not None

    if days is None:
        assert expires_at is None
        assert first == (
            "new buyer token for carol@example.com (never expires); shown once, store it now:"
        )
        assert await works_at(after + timedelta(days=36500))
        return
    assert expires_at is not None
    lifetime = timedelta(days=days)
    assert before + lifetime - timedelta(seconds=1) <= expires_at <= after + lifetime
    # The expiry printed is the one stored (to the minute).
    assert first == (
        f"new buyer token for carol@example.com (expires {expires_at:%Y-%m-%d %H:%M} UTC, "
        f"in {days:g} days); shown once, store it now:"
    )
    assert await works_at(expires_at - timedelta(seconds=1))
    assert not await works_at(expires_at)


async def test_demo_tokens_never_expire_and_seed_demo_says_so(
    db_env: dict[str, str], workdir: Path, uow_factory: SqlUnitOfWorkFactory
) -> None:
    # A demo that silently broke after RPC_SERVER_TOKEN_TTL days would be no demo.
    env = {**db_env, "RPC_SERVER_TOKEN_TTL": "1"}
    seeded = await cli("seed-demo", cwd=workdir, env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert "demo tokens never expire" in seeded.stdout
    ten_years_on = datetime.now(UTC) + timedelta(days=3650)
    for token in ("demo-alice", "demo-bob", "demo-support", "demo-payments"):
        assert await services.authenticate(uow_factory, token, clock=lambda: ten_years_on), token


# --- the demo hint ------------------------------------------------------------------------

DEMO_HINT = "try: curl -s -H 'Authorization: Bearer demo-alice'"


def serve_output(env: dict[str, str], workdir: Path) -> str:
    output: list[str] = []
    with running_server(env, cwd=workdir, output=output):
        pass
    return output[0]


def test_serve_prints_the_demo_hint_only_when_demo_data_exists(
    db_env: dict[str, str], workdir: Path
) -> None:
    without = serve_output(db_env, workdir)
    assert "JSON-RPC 2.0 endpoint: POST http://127.0.0.1:" in without
    assert "demo-alice" not in without and "try: curl" not in without

    assert run("seed-demo", cwd=workdir, env=db_env).returncode == 0
    assert DEMO_HINT in serve_output(db_env, workdir)

    # Once alice's demo token is revoked the hint does not advertise it.
    assert run("revoke-token", "demo-alice", cwd=workdir, env=db_env).returncode == 0
    revoked = serve_output(db_env, workdir)
    assert "demo-alice" not in revoked
    assert "try: curl -s -H 'Authorization: Bearer demo-bob'" in revoked
