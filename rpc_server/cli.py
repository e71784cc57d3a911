"""The ``rpc-server`` command: migrate, create-token, create-course, seed-demo, serve,
sign-payment, and the receipt outbox's send-mail, mail-status and mail-retry.

Configuration comes from ``RPC_SERVER_*`` environment variables (see ``config.Settings``);
flags override them where offered.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

from marshmallow import ValidationError

from rpc_server import __version__
from rpc_server.config import ConfigError, Settings
from rpc_server.database import create_engine, engine_options, is_sqlite
from rpc_server.deliverer import build_deliverer
from rpc_server.demo import DEMO_PAYMENT_KEY, live_demo_tokens, seed_demo
from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import PaymentOutcome
from rpc_server.domain.states import Scope
from rpc_server.log_output import LoopBatchedStreamHandler
from rpc_server.migrate import migrate
from rpc_server.payment_signatures import sign
from rpc_server.request_id import RequestIdFilter
from rpc_server.unit_of_work import SqlAlchemyUnitOfWorkFactory
from rpc_server.workers import run_server, supervise
from schemas import CourseSaveParams

T = TypeVar("T")
log = logging.getLogger("rpc_server")


def with_database(
    settings: Settings, work: Callable[[SqlAlchemyUnitOfWorkFactory], Awaitable[T]]
) -> T:
    """Run ``work`` with a unit-of-work factory on the configured database."""

    async def run() -> T:
        engine = create_engine(settings.database_url, **engine_options(settings))
        try:
            return await work(SqlAlchemyUnitOfWorkFactory(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(migrate(settings.database_url))
    print("database schema is up to date")
    return 0


def cmd_create_token(settings: Settings, args: argparse.Namespace) -> int:
    if args.expires_in is not None and args.expires_in <= 0:
        print("error: --expires-in must be a positive number of days", file=sys.stderr)
        return 2
    if args.staff and args.scope not in (None, Scope.STAFF.value):
        print(f"error: --staff means --scope staff, not --scope {args.scope}", file=sys.stderr)
        return 2
    scope = Scope.STAFF if args.staff else Scope(args.scope or Scope.BUYER.value)
    expires_in = None if args.expires_in is None else timedelta(days=args.expires_in)
    token = with_database(
        settings,
        lambda uow: services.issue_token(uow, args.email, scope=scope, expires_in=expires_in),
    )
    until = f", valid for {args.expires_in:g} days" if expires_in else ""
    print(f"new {scope} token for {args.email}{until} (shown once, store it now):")
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
        asyncio.run(migrate(settings.database_url))
    users = with_database(
        settings, lambda uow: seed_demo(uow, FrontendLinks(settings.frontend_url))
    )
    print("demo data ready. Demo tokens (well-known: never use them in production):")
    for user in users:
        print(f"  {user.email} ({user.scope}): {user.token}")
    if not settings.payment_keys:
        print(
            "payments: while demo tokens are live and RPC_SERVER_PAYMENT_KEYS is unset, "
            "serve verifies payment events with the public demo key"
        )
    return 0


def payment_keys_in_use(settings: Settings) -> tuple[tuple[str, ...], bool]:
    """The payment keys ``serve`` and ``sign-payment`` use, and whether demo data is live.

    Without ``RPC_SERVER_PAYMENT_KEYS``, the demo key is used while demo tokens are live
    (after ``seed-demo``), so the demo pays with no set-up; otherwise no key (fail closed).
    """
    try:
        demo_live = bool(with_database(settings, live_demo_tokens))
    except Exception:  # an unmigrated or unreachable database has no demo tokens
        demo_live = False
    if settings.payment_keys:
        return settings.payment_keys, demo_live or DEMO_PAYMENT_KEY in settings.payment_keys
    return ((DEMO_PAYMENT_KEY,) if demo_live else ()), demo_live


def cmd_sign_payment(settings: Settings, args: argparse.Namespace) -> int:
    keys, _ = payment_keys_in_use(settings)
    if not keys:
        print("error: no payment key: set RPC_SERVER_PAYMENT_KEYS", file=sys.stderr)
        return 2

    async def work(uow_factory: SqlAlchemyUnitOfWorkFactory) -> Any:
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
    async def work(uow: SqlAlchemyUnitOfWorkFactory) -> int:
        deliverer = build_deliverer(settings, uow)
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
    async def work(uow_factory: SqlAlchemyUnitOfWorkFactory) -> tuple[Any, Any]:
        async with uow_factory() as uow:
            return await uow.receipts.counts(), await uow.receipts.overview(limit=args.limit)

    counts, entries = with_database(settings, work)
    print("  ".join(f"{status}: {counts.get(status, 0)}" for status in ("pending", "sent", "dead")))
    for entry in entries:
        when = entry.sent_at or entry.next_attempt_at
        line = (
            f"{entry.outbox_id:>6}  {entry.status:<7}  attempts={entry.attempts}  "
            f"{when:%Y-%m-%d %H:%M:%S}  purchase={entry.purchase_id}  to={entry.recipient}"
        )
        if entry.status != "sent" and entry.last_error:
            line += f"  last_error={entry.last_error}"
        print(line)
    return 0


def cmd_mail_retry(settings: Settings, args: argparse.Namespace) -> int:
    async def work(uow_factory: SqlAlchemyUnitOfWorkFactory) -> bool:
        async with uow_factory(write=True) as uow:
            requeued = await uow.receipts.requeue(args.id, now=services.utcnow())
            await uow.commit()
        return requeued

    if not with_database(settings, work):
        print(f"error: message {args.id} is not dead (see rpc-server mail-status)", file=sys.stderr)
        return 1
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
    if is_sqlite(settings.database_url):
        # The embedded database needs no separate step: bring it up to date here.
        asyncio.run(migrate(settings.database_url))
    keys, demo_live = payment_keys_in_use(settings)
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
    print(
        "try: curl -s -H 'Authorization: Bearer demo-alice' "
        f"""-d '{{"jsonrpc": "2.0", "method": "purchase.list", "id": 1}}' {url}""",
        flush=True,
    )
    workers = args.workers or settings.workers
    if workers == 1:
        run_server(settings, host, port)
        return 0
    return supervise(settings, host, port, workers)


def configure_logging(level: str) -> None:
    """Log to stderr, each line stamped with the id of the request it belongs to
    (written a loop iteration's lines at a time: ``rpc_server.log_output``)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        handlers=[LoopBatchedStreamHandler(sys.stderr)],
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    token.add_argument("email")
    token.add_argument(
        "--scope",
        choices=[scope.value for scope in Scope],
        help="what the token may do: buyer (default; own purchases), staff (support desk) "
        "or payments (the shop's payment backend)",
    )
    token.add_argument("--staff", action="store_true", help="short for --scope staff")
    token.add_argument(
        "--expires-in", type=float, metavar="DAYS", help="the token stops working after DAYS"
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
    status.add_argument("--limit", type=int, default=50, help="how many messages (newest first)")
    status.set_defaults(run=cmd_mail_status)

    retry = commands.add_parser("mail-retry", help="requeue a dead receipt")
    retry.add_argument("id", type=int, help="the message id shown by mail-status")
    retry.set_defaults(run=cmd_mail_retry)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", help="address to listen on (RPC_SERVER_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (RPC_SERVER_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
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
    configure_logging(settings.log_level)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    return run(settings, args)


if __name__ == "__main__":
    sys.exit(main())
