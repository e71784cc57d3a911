"""An example payment provider for the demo: a stand-in for Stripe, Adyen, PayPal and the like.

In a real shop the browser pays on the provider's page, the provider charges the card,
and the shop's payment backend, once the provider has confirmed the payment, sends the
server one *signed payment event* (Standard Webhooks: https://www.standardwebhooks.com).
The server trusts nothing else: a buyer's ``purchase.fulfill`` to ``fulfilled`` must carry
that event as its ``payment_proof``. This small aiohttp app plays the provider and the
payment backend together, so that the demo pays with no account anywhere.

``POST /pay`` with JSON ``{"purchase_id": "…"}`` (CORS allowed for the browser
frontend's origin):

1. reads the purchase with ``purchase.get`` and the payments token: the amount and the
   currency charged are the ones the shop stores, never what the browser says;
2. "charges" it: every payment goes through, except with ``"fail": true`` or the
   declined test card ``"card": "4000 0000 0000 0002"``, which end in ``payment.failed``;
3. signs ONE payment event with the payment key;
4. posts it to the shop's webhook (``POST /webhooks/payments``), as a provider would;
5. answers the browser with the same event, ``{"payment_proof": {...}, ...}``, so that
   the page can call ``purchase.fulfill`` with it. Whichever of the two reaches the
   server first applies; the other repeats and changes nothing.

Run it beside the server (after ``rpc-server seed-demo``), from the repository's root:

    python examples/payment_provider.py

It listens on 127.0.0.1 only. Settings (environment):

- ``PROVIDER_PORT``: port to listen on (default 8090);
- ``RPC_URL``: the shop's endpoint (default http://127.0.0.1:8080/rpc);
- ``PAYMENTS_TOKEN``: a payments-scope token (default ``demo-payments``, from seed-demo);
- ``PAYMENT_KEY``: the ``whsec_`` secret events are signed with (default: the PUBLIC demo
  key, which ``rpc-server serve`` accepts only while the demo data is live);
- ``WEBHOOK_URL``: where events are posted (default
  http://127.0.0.1:8080/webhooks/payments; empty: post none, the browser's proof alone
  then fulfils);
- ``PROVIDER_CORS_ORIGINS``: comma-separated browser origins that may call ``/pay``
  (default http://127.0.0.1:8000,http://localhost:8000, where the README serves the
  frontend).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiohttp_cors
from aiohttp import web
from standardwebhooks import Webhook

# The PUBLIC demo key (rpc-server seed-demo): anyone can sign with it, so the server
# accepts it only while the demo data is live. A real payment backend reads its own
# secret from its configuration, and the server lists it in RPC_SERVER_PAYMENT_KEYS.
from rpc_server.cli.demo import DEMO_PAYMENT_KEY

# A card number that is always declined (the one Stripe's test mode uses for it).
DECLINED_CARD = "4000000000000002"
DECLINE_MESSAGE = "Your card was declined."

log = logging.getLogger("payment_provider")


@dataclass(frozen=True)
class Config:
    port: int
    rpc_url: str
    payments_token: str
    payment_key: str
    webhook_url: str
    cors_origins: tuple[str, ...]

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        origins = env.get("PROVIDER_CORS_ORIGINS", "http://127.0.0.1:8000,http://localhost:8000")
        return cls(
            port=int(env.get("PROVIDER_PORT", "8090")),
            rpc_url=env.get("RPC_URL", "http://127.0.0.1:8080/rpc"),
            payments_token=env.get("PAYMENTS_TOKEN", "demo-payments"),
            payment_key=env.get("PAYMENT_KEY", DEMO_PAYMENT_KEY),
            webhook_url=env.get("WEBHOOK_URL", "http://127.0.0.1:8080/webhooks/payments"),
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
        )


class Refused(Exception):
    """A payment this provider will not take; answered with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def look_up(app: web.Application, purchase_id: str) -> dict[str, Any]:
    """The purchase as the shop stores it: ``purchase.get`` with the payments token."""
    config = app[CONFIG]
    call = {"jsonrpc": "2.0", "method": "purchase.get", "params": [purchase_id], "id": 1}
    headers = {"Authorization": f"Bearer {config.payments_token}"}
    try:
        async with app[SESSION].post(config.rpc_url, json=call, headers=headers) as response:
            answer = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise Refused(502, f"the shop at {config.rpc_url} did not answer: {exc!r}") from None
    if "error" in answer:
        error = answer["error"]
        status = {404: 404, -32602: 400}.get(error.get("code"), 502)
        raise Refused(status, f"purchase.get answered {error.get('code')} {error.get('message')}")
    purchase: dict[str, Any] = answer["result"]
    return purchase


def signed_event(key: str, payload: str) -> dict[str, Any]:
    """One Standard Webhooks event: its id, timestamp (Unix seconds), signature, payload."""
    message_id = f"msg_{secrets.token_hex(12)}"
    timestamp = int(time.time())
    signature = Webhook(key).sign(
        msg_id=message_id, timestamp=datetime.fromtimestamp(timestamp, UTC), data=payload
    )
    return {"id": message_id, "timestamp": timestamp, "signature": signature, "payload": payload}


async def deliver(app: web.Application, event: dict[str, Any]) -> dict[str, Any]:
    """POST the event to the shop's webhook: the three headers, the payload as the body."""
    url = app[CONFIG].webhook_url
    if not url:
        return {"delivered": False, "reason": "WEBHOOK_URL is empty"}
    headers = {
        "webhook-id": event["id"],
        "webhook-timestamp": str(event["timestamp"]),
        "webhook-signature": event["signature"],
        "Content-Type": "application/json",
    }
    try:
        async with app[SESSION].post(url, data=event["payload"], headers=headers) as response:
            answer = await response.json(content_type=None)
            return {"delivered": True, "http_status": response.status, "answer": answer}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        # A real provider retries later; the browser's proof still reaches the shop.
        log.warning("webhook %s not delivered: %r", url, exc)
        return {"delivered": False, "reason": repr(exc)}


async def handle_pay(request: web.Request) -> web.Response:
    """POST /pay {"purchase_id", "fail"?, "card"?}: charge, sign, post, answer the proof."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    purchase_id = body.get("purchase_id") if isinstance(body, dict) else None
    if not isinstance(purchase_id, str) or not purchase_id:
        return web.json_response({"error": 'send JSON {"purchase_id": "..."}'}, status=400)
    try:
        purchase = await look_up(request.app, purchase_id)
    except Refused as refused:
        return web.json_response({"error": str(refused)}, status=refused.status)
    if purchase["state"] != "pending":
        message = f"purchase {purchase_id} is {purchase['state']}: there is nothing to pay"
        return web.json_response({"error": message}, status=409)

    card = str(body.get("card") or "").replace(" ", "")
    declined = body.get("fail") is True or card == DECLINED_CARD
    data = {
        "purchase_id": purchase["purchase_id"],
        "amount": purchase["amount"],  # exactly as the shop stores it, e.g. "49.00"
        "currency": purchase["currency"],
        "payment_ref": f"pi_demo_{secrets.token_hex(8)}",
    }
    if declined:
        data["error_message"] = DECLINE_MESSAGE
    kind = "payment.failed" if declined else "payment.succeeded"
    event = signed_event(request.app[CONFIG].payment_key, json.dumps({"type": kind, "data": data}))
    webhook = await deliver(request.app, event)
    log.info(
        "%s %s %s for purchase %s (%s); webhook: %s",
        kind, data["amount"], data["currency"], purchase_id, data["payment_ref"],
        webhook.get("answer", webhook.get("reason")),
    )  # fmt: skip
    return web.json_response({"payment_proof": event, "type": kind, "webhook": webhook})


async def handle_index(request: web.Request) -> web.Response:
    """GET /: what this is (and a way to see that it is up)."""
    return web.json_response(
        {
            "service": "example payment provider (a demo stand-in for a real one)",
            "pay": 'POST /pay {"purchase_id": "...", "fail": false}',
        }
    )


async def client_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[SESSION] = session
        yield


def build_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/", handle_index)
    pay = app.router.add_post("/pay", handle_pay)
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False, allow_headers=("Content-Type",), max_age=600
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in config.cors_origins})
    cors.add(pay)
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = Config.from_env()
    print(
        f"example payment provider on http://127.0.0.1:{config.port}/pay "
        f"(shop: {config.rpc_url}, webhook: {config.webhook_url or 'none'})",
        flush=True,
    )
    # Loopback only: this provider pays for anything, with a public key.
    web.run_app(build_app(config), host="127.0.0.1", port=config.port, print=None)


if __name__ == "__main__":
    main()
