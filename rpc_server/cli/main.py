"""The ``rpc-server`` command: migrate, create-token, create-course, seed-demo, serve,
sign-payment, and the receipt outbox's send-mail, mail-status and mail-retry.

Configuration comes from ``RPC_SERVER_*`` environment variables (see ``config.Settings``);
flags override them where offered. Flags are checked as they are parsed (``cli_input``);
a command that fails says why in one line on stderr and exits non-zero, never with a
traceback (``cli_errors``). Only ``migrate`` (and ``seed-demo`` and ``serve`` on SQLite,
which migrate first) create or change a schema; every other command needs a database at
the latest migration (``schema_version``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

from marshmallow import ValidationError

from rpc_server import __version__
from rpc_server.cli.demo import DEMO_PAYMENT_KEY, DemoUser, live_demo_tokens, seed_demo
from rpc_server.cli.errors import (
    USAGE,
    CommandError,
    check_database_url,
    explain,
    require_database_directory,
    require_database_file,
)
from rpc_server.cli.input import (
    TokenLifetime,
    email_address,
    listen_port,
    outbox_id,
    positive_int,
    token_lifetime,
    worker_count,
)
from rpc_server.config import ConfigError, Settings, unknown_variables
from rpc_server.db.engines import engine_from_settings, is_sqlite
from rpc_server.db.migrate import migrate, quiet_alembic_context_lines
from rpc_server.db.schema_version import check_schema, head_revision
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.errors import NotFound
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.outbox import OutboxStatus
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import PaymentOutcome
from rpc_server.domain.states import Scope
from rpc_server.log_output import configure_logging
from rpc_server.mail.deliverer import build_deliverer
from rpc_server.payment_signatures import sign
from rpc_server.server.listening import listen_problem
from rpc_server.server.serving import run_server
from rpc_server.server.worker_pool import run_workers
from schemas import CourseSaveParams

T = TypeVar("T")
log = logging.getLogger("rpc_server")


def with_database(settings: Settings, work: Callable[[SqlUnitOfWorkFactory], Awaitable[T]]) -> T:
    """Run ``work`` with a unit-of-work factory on the configured database.

    The database must exist and be at the latest migration (``CommandError`` or
    ``SchemaNotCurrent`` otherwise, before ``work`` runs): a SQLite file is never created
    here, only by ``migrate`` (and by ``seed-demo`` and ``serve``, which migrate SQLite).
    """
    require_database_file(settings.database_url)

    async def run() -> T:
        engine = engine_from_settings(settings)
        try:
            await check_schema(engine)
            return await work(SqlUnitOfWorkFactory(engine))
        finally:
            await engine.close()

    return asyncio.run(run())


def migrate_sqlite_here(settings: Settings) -> None:
    """Create or upgrade the SQLite file (what ``seed-demo`` and ``serve`` do first)."""
    require_database_directory(settings.database_url)
    asyncio.run(migrate(settings.database_url))


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    require_database_directory(settings.database_url)
    asyncio.run(migrate(settings.database_url))
    print(f"database schema is up to date (revision {head_revision()})")
    return 0


def cmd_create_token(settings: Settings, args: argparse.Namespace) -> int:
    if args.staff and args.scope not in (None, Scope.STAFF.value):
        print(f"error: --staff means --scope staff, not --scope {args.scope}", file=sys.stderr)
        return 2
    scope = Scope.STAFF if args.staff else Scope(args.scope or Scope.BUYER.value)
    # No --expires-in: RPC_SERVER_TOKEN_TTL (90 days unless set; "never" only if said).
    lifetime: TokenLifetime = args.expires_in or TokenLifetime(settings.token_ttl)
    expires_in = lifetime.as_timedelta()
    now = services.utcnow()  # the issue time, so that the expiry printed is the one stored
    token = with_database(
        settings,
        lambda uow: services.issue_token(
            uow, args.email, scope=scope, expires_in=expires_in, clock=lambda: now
        ),
    )
    if expires_in is None:
        until = "never expires"
    else:
        until = f"expires {now + expires_in:%Y-%m-%d %H:%M} UTC, in {lifetime.days:g} days"
    print(f"new {scope} token for {args.email} ({until}); shown once, store it now:")
    print(token)
    return 0


def cmd_revoke_token(settings: Settings, args: argparse.Namespace) -> int:
    if (args.token is None) == (args.user is None):
        print("error: give either a TOKEN or --user EMAIL", file=sys.stderr)
        return 2
    if args.user is not None:
        count = with_database(settings, lambda uow: services.revoke_tokens_of(uow, args.user))
        print(f"{count} token(s) of {args.user} revoked")
        return 0
    if not with_database(settings, lambda uow: services.revoke_token(uow, args.token)):
        print("error: no such live token", file=sys.stderr)
        return 1
    print("token revoked")
    return 0


def cmd_create_course(settings: Settings, args: argparse.Namespace) -> int:
    try:
        course = CourseSaveParams().load(
            {"slug": args.slug, "title": args.title, "price": args.price, "currency": args.currency}
        )
    except ValidationError as exc:
        for field, messages in exc.messages_dict.items():
            print(f"error: --{field}: {' '.join(map(str, messages))}", file=sys.stderr)
        return 2
    saved = with_database(settings, lambda uow: services.save_course(uow, **course))
    print(f"course {saved.slug}: {saved.title}, {saved.price} {saved.currency}")
    return 0


def cmd_seed_demo(settings: Settings, args: argparse.Namespace) -> int:
    if is_sqlite(settings.database_url):
        migrate_sqlite_here(settings)
    users = with_database(
        settings, lambda uow: seed_demo(uow, FrontendLinks(settings.frontend_url))
    )
    print("demo data ready. Demo tokens (well-known: never use them in production):")
    for user in users:
        print(f"  {user.email} ({user.scope}): {user.token}")
    print(
        "demo tokens never expire (so the demo keeps working); "
        "revoke them with rpc-server revoke-token demo-alice …"
    )
    if not settings.payment_keys:
        print(
            "payments: while demo tokens are live and RPC_SERVER_PAYMENT_KEYS is unset, "
            "serve verifies payment events with the public demo key"
        )
    return 0


def payment_keys_in_use(
    settings: Settings, live_demo: Sequence[DemoUser]
) -> tuple[tuple[str, ...], bool]:
    """The payment keys ``serve`` and ``sign-payment`` use, and whether demo data is live.

    Without ``RPC_SERVER_PAYMENT_KEYS``, the demo key is used while demo tokens are live
    (``live_demo``, after ``seed-demo``), so the demo pays with no set-up; otherwise no
    key (fail closed).
    """
    demo_live = bool(live_demo)
    if settings.payment_keys:
        return settings.payment_keys, demo_live or DEMO_PAYMENT_KEY in settings.payment_keys
    return ((DEMO_PAYMENT_KEY,) if demo_live else ()), demo_live


def cmd_sign_payment(settings: Settings, args: argparse.Namespace) -> int:
    keys, _ = payment_keys_in_use(settings, with_database(settings, live_demo_tokens))
    if not keys:
        print("error: no payment key: set RPC_SERVER_PAYMENT_KEYS", file=sys.stderr)
        return 2

    async def work(uow_factory: SqlUnitOfWorkFactory) -> Any:
        async with uow_factory() as uow:
            return await uow.purchases.get(args.purchase_id, owner_id=None)

    purchase = with_database(settings, work)
    if purchase is None:
        print(f"error: no purchase {args.purchase_id}", file=sys.stderr)
        return 1
    data: dict[str, str] = {
        "purchase_id": purchase.purchase_id,
        "amount": f"{purchase.amount:.2f}",
        "currency": purchase.currency,
        "payment_ref": args.ref or f"manual_{secrets.token_hex(8)}",
    }
    outcome = PaymentOutcome.SUCCEEDED
    if args.failed is not None:
        outcome = PaymentOutcome.FAILED
        data["error_message"] = args.failed
    payload = json.dumps({"type": outcome.value, "data": data})
    message_id = f"evt_{secrets.token_hex(12)}"
    timestamp = int(time.time())
    proof = {
        "id": message_id,
        "timestamp": timestamp,
        "signature": sign(keys[0], message_id, timestamp, payload),
        "payload": payload,
    }
    print(json.dumps(proof))
    return 0


def cmd_send_mail(settings: Settings, args: argparse.Namespace) -> int:
    async def work(uow_factory: UnitOfWorkFactory) -> int:
        deliverer = build_deliverer(settings, uow_factory)
        if args.once:
            return await deliverer.deliver_all()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, deliverer.stop)
        await deliverer.run()
        return 0

    handled = with_database(settings, work)
    if args.once:
        print(f"{handled} receipt(s) handled")
    return 0


def cmd_mail_status(settings: Settings, args: argparse.Namespace) -> int:
    overview = with_database(
        settings, lambda uow_factory: services.outbox_overview(uow_factory, limit=args.limit)
    )
    print("  ".join(f"{status}: {overview.counts[status]}" for status in OutboxStatus))
    for entry in overview.entries:
        # Sent: when it went; dead: when it died (recorded then); pending: when it is due.
        when = entry.sent_at if entry.sent_at is not None else entry.next_attempt_at
        label = {OutboxStatus.SENT: "sent", OutboxStatus.DEAD: "died"}.get(entry.status, "due")
        line = (
            f"{entry.outbox_id:>6}  {entry.status:<7}  attempts={entry.attempts}  "
            f"{label} {when:%Y-%m-%d %H:%M:%S} UTC  purchase={entry.purchase_id}  "
            f"to={entry.recipient}"
        )
        if entry.status is not OutboxStatus.SENT and entry.last_error:
            line += f"  last_error={entry.last_error}"
        print(line)
    return 0


def cmd_mail_retry(settings: Settings, args: argparse.Namespace) -> int:
    try:
        kept = with_database(
            settings, lambda uow_factory: services.requeue_receipt(uow_factory, args.id)
        )
    except NotFound:
        raise CommandError(f"no message {args.id} (see rpc-server mail-status)") from None
    if kept is not None:
        raise CommandError(
            f"message {args.id} is not dead, it is {kept}: only dead messages are requeued"
        )
    print(f"message {args.id} requeued")
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.host
    port = args.port or settings.port
    # Before anything else (on SQLite, before the file is made): a port in use is one line.
    problem = listen_problem(host, port)
    if problem is not None:
        raise CommandError(f"cannot listen on {host}:{port}: {problem}")
    if is_sqlite(settings.database_url):
        # The embedded database needs no separate step: bring it up to date here.
        migrate_sqlite_here(settings)
    # On PostgreSQL a schema behind the code is refused here (SchemaNotCurrent: "run
    # rpc-server migrate"), as is a database that cannot be reached.
    live_demo = with_database(settings, live_demo_tokens)
    keys, demo_live = payment_keys_in_use(settings, live_demo)
    if demo_live and not is_loopback(host) and not (args.allow_demo or settings.allow_demo):
        print(
            f"error: refusing to listen on {host}: the demo tokens or the demo payment key "
            "are live, and anyone could use them. Revoke them "
            "(rpc-server revoke-token demo-alice …, set RPC_SERVER_PAYMENT_KEYS) or pass "
            "--allow-demo",
            file=sys.stderr,
        )
        return 2
    if keys != settings.payment_keys:
        log.warning("demo data is live: payment events are verified with the public demo key")
    # The address served, as the OpenRPC document's server URL says it (Settings.rpc_url).
    settings = replace(settings, payment_keys=keys, host=host, port=port)
    url = f"http://{host}:{port}/rpc"
    print(f"JSON-RPC 2.0 endpoint: POST {url}", flush=True)
    demo_token = next((user.token for user in live_demo if user.scope is Scope.BUYER), None)
    if demo_token is not None:  # only where the demo's data is there to answer it
        print(
            f"try: curl -s -H 'Authorization: Bearer {demo_token}' "
            f"""-d '{{"jsonrpc": "2.0", "method": "purchase.list", "id": 1}}' {url}""",
            flush=True,
        )
    workers = args.workers or settings.workers
    try:
        if workers > 1:
            # gunicorn's arbiter and N workers (rpc_server.server.worker_pool). One process is
            # served right here, not under gunicorn: the same serving code and drain
            # (rpc_server.server.serving), without an arbiter process and its heartbeat beside
            # it, and with the port bound before the app starts (an error is one line).
            return run_workers(settings, host, port, workers)
        run_server(settings, host, port)
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        # Taken between listen_problem and the server's own bind.
        raise CommandError(f"cannot listen on {host}:{port}: {os.strerror(exc.errno)}") from exc


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (not the usage block, then the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="rpc-server",
        description="JSON-RPC 2.0 purchase fulfillment server. "
        "Configured by RPC_SERVER_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="create or upgrade the database schema").set_defaults(
        run=cmd_migrate
    )

    token = commands.add_parser(
        "create-token", help="create the user if needed and print a new token (last line)"
    )
    token.add_argument("email", type=email_address)
    token.add_argument(
        "--scope",
        choices=[scope.value for scope in Scope],
        help="what the token may do: buyer (default; own purchases), staff (support desk) "
        "or payments (the shop's payment backend)",
    )
    token.add_argument("--staff", action="store_true", help="short for --scope staff")
    token.add_argument(
        "--expires-in",
        type=token_lifetime,
        metavar="DAYS",
        help="the token stops working after DAYS (default RPC_SERVER_TOKEN_TTL, 90) or never",
    )
    token.set_defaults(run=cmd_create_token)

    revoke = commands.add_parser(
        "revoke-token", help="revoke a token at once (or every token of a user)"
    )
    revoke.add_argument("token", nargs="?", help="the token to revoke")
    revoke.add_argument("--user", metavar="EMAIL", help="revoke every token of this user")
    revoke.set_defaults(run=cmd_revoke_token)

    course = commands.add_parser("create-course", help="create or update a course")
    course.add_argument("slug")
    course.add_argument("--title", required=True)
    course.add_argument("--price", required=True, help="a decimal, for example 49.00")
    course.add_argument("--currency", required=True, help="ISO 4217 code, for example USD")
    course.set_defaults(run=cmd_create_course)

    commands.add_parser(
        "seed-demo", help="create demo users, courses and purchases; print demo tokens"
    ).set_defaults(run=cmd_seed_demo)

    send_mail = commands.add_parser(
        "send-mail", help="deliver receipt emails (for running the deliverer on its own)"
    )
    send_mail.add_argument("--once", action="store_true", help="deliver what is due, then exit")
    send_mail.set_defaults(run=cmd_send_mail)

    status = commands.add_parser("mail-status", help="list pending, sent and dead receipts")
    status.add_argument(
        "--limit", type=positive_int, default=50, help="how many messages (newest first)"
    )
    status.set_defaults(run=cmd_mail_status)

    retry = commands.add_parser("mail-retry", help="requeue a dead receipt")
    retry.add_argument("id", type=outbox_id, help="the message id shown by mail-status")
    retry.set_defaults(run=cmd_mail_retry)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", help="address to listen on (RPC_SERVER_HOST)")
    serve.add_argument("--port", type=listen_port, help="port to listen on (RPC_SERVER_PORT)")
    serve.add_argument(
        "--workers",
        type=worker_count,
        help="worker processes sharing the port (RPC_SERVER_WORKERS, default 1)",
    )
    serve.add_argument(
        "--allow-demo",
        action="store_true",
        help="listen on a non-loopback address even while demo tokens or the demo key live "
        "(RPC_SERVER_ALLOW_DEMO)",
    )
    serve.set_defaults(run=cmd_serve)

    sign_payment = commands.add_parser(
        "sign-payment",
        help="print a signed payment event for a purchase (a payment_proof, as JSON)",
    )
    sign_payment.add_argument("purchase_id")
    sign_payment.add_argument("--ref", help="the provider's payment reference (default: random)")
    sign_payment.add_argument(
        "--failed", metavar="MESSAGE", help="a payment.failed event with this error message"
    )
    sign_payment.set_defaults(run=cmd_sign_payment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for unknown in unknown_variables():  # a typo'd name would otherwise do nothing
        print(f"warning: unknown variable {unknown}", file=sys.stderr)
    configure_logging(settings.log_level, settings.log_format, trace_ids=settings.tracing)
    quiet_alembic_context_lines()
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        check_database_url(settings.database_url)
        status = run(settings, args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message, status = explain(exc, settings.database_url)
        log.debug("%s failed", args.command, exc_info=exc)
        print(f"error: {message}", file=sys.stderr)
    return status


def stdout_closed() -> int:
    """Exit quietly when whoever read our output stopped (``mail-status | head -3``).

    As Python's documentation advises: the rest of the output goes to /dev/null, so that
    flushing it at exit raises nothing more. The status is the one a process killed by
    SIGPIPE reports to the shell, as ``cat`` or ``ls`` would.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
