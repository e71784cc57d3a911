"""Who may read ``GET /metrics``: this machine, or a scraper holding the metrics token.

Where it sits: ``handle_metrics`` (``rpc_server.app``) asks ``may_scrape`` before it
renders anything. The series name every method, error rate and backlog: what an attacker
probing the service would like to see, so they are not public by default.

Decided: loopback by default, a bearer token (``RPC_SERVER_METRICS_TOKEN``) for a
scraper elsewhere. Not a separate listening address: ``serve --workers N`` shares one
listening socket among its workers, and a second address would have to be bound by one of
them (or by every one with ``SO_REUSEPORT``, each answering with its own values), while a
token works the same on every process and behind any load balancer; Prometheus sends it
with ``authorization: {credentials: …}``. A request that came through a proxy on this
machine (one carrying ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP``) is not a local
scraper even though its peer is loopback: without the token it is refused.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from rpc_server.http.client_address import parse_address

FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
REFUSAL = (
    "/metrics answers scrapers on this machine (loopback, not through a proxy) or "
    "holding the metrics token (RPC_SERVER_METRICS_TOKEN, sent as Authorization: Bearer)"
)


def may_scrape(request: web.Request, token: str | None) -> bool:
    """Whether ``request`` may read the metrics (see the module docstring)."""
    if token is not None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            return True
    if any(header in request.headers for header in FORWARDING_HEADERS):
        return False
    peer = parse_address(request.remote or "")
    return peer is not None and peer.is_loopback
