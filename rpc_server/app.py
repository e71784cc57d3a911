"""The aiohttp application factory: routes, the ``POST /rpc`` handler, app-wide resources.

Resources (engine, unit-of-work factory) are created in ``cleanup_ctx`` and kept under
typed app keys; nothing is global at import time, so tests build apps with their own
settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.db.engines import engine_from_settings
from rpc_server.db.errors import database_unavailable
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.links import FrontendLinks
from rpc_server.http import (
    access_log,
    content_encoding,
    cors,
    docs_page,
    security_headers,
    webhooks,
)
from rpc_server.http import errors as http_errors
from rpc_server.http.client_address import ClientAddresses
from rpc_server.http.metrics_access import REFUSAL, may_scrape
from rpc_server.http.readiness import Readiness
from rpc_server.http.request_id import request_id_middleware
from rpc_server.jsonrpc import json_codec
from rpc_server.jsonrpc.batch_deadline import BatchDeadline
from rpc_server.jsonrpc.call_timer import CallTimer
from rpc_server.jsonrpc.context import LiveSession, RpcContext, failed_logins_log
from rpc_server.jsonrpc.credentials import read_credentials
from rpc_server.jsonrpc.envelope import ParseError, answer, invalid_request, parse, parse_error
from rpc_server.jsonrpc.openrpc import build_document
from rpc_server.jsonrpc.rate_limit import RateLimits, build_rate_limits
from rpc_server.jsonrpc.registry import MethodRegistry
from rpc_server.jsonrpc.token_cache import ActorCache
from rpc_server.live import transport
from rpc_server.live.connection import LiveConnection
from rpc_server.log_throttle import ThrottledLog
from rpc_server.mail.deliverer import ReceiptDeliverer, build_deliverer
from rpc_server.methods import REGISTRY
from rpc_server.payment_signatures import PaymentSignatures
from rpc_server.server.client_faults import receiving_body

if TYPE_CHECKING:  # imported when used: rpc_server.observability.metrics says why
    from opentelemetry.sdk.trace import TracerProvider

    from rpc_server.observability.metrics import Metrics
    from rpc_server.observability.tracing import Tracing


@dataclass(frozen=True)
class ServiceDescription:
    """The OpenRPC document, and the docs page rendered from it, built once per app.

    ``fragment`` is the document serialized once: ``rpc.discover`` answers with it, and
    every answer splices those bytes in instead of serializing the document again.
    """

    document: dict[str, Any]
    html: str
    fragment: json_codec.Fragment


@dataclass
class Shutdown:
    """When the server must be gone by (``loop.time()``), once shutdown has begun."""

    deadline: float | None = None

    def remaining(self, default: float) -> float:
        if self.deadline is None:
            return default
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


log = logging.getLogger("rpc_server.app")

SETTINGS = web.AppKey("settings", Settings)
REGISTRY_KEY = web.AppKey("registry", MethodRegistry)
ENGINE = web.AppKey("engine", Engine)
UOW_FACTORY = web.AppKey("uow_factory", SqlUnitOfWorkFactory)
OPENRPC = web.AppKey("openrpc", ServiceDescription)
DELIVERER = web.AppKey("deliverer", ReceiptDeliverer)
SHUTDOWN = web.AppKey("shutdown", Shutdown)
ACTORS = web.AppKey("actors", ActorCache)
LIMITER = web.AppKey("rate_limiter", RateLimits)
CLIENTS = web.AppKey("client_addresses", ClientAddresses)
FAILED_LOGINS = web.AppKey("failed_logins", ThrottledLog)
CALL_TIMER = web.AppKey("call_timer", CallTimer)
LINKS = web.AppKey("links", FrontendLinks)
PAYMENTS = web.AppKey("payments", PaymentSignatures)
READINESS = web.AppKey("readiness", Readiness)
LIVE = web.AppKey("live", transport.LiveHub)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")

# An oversized body is read and thrown away (so the client sees our 413 rather than a
# reset connection) up to this many bytes; beyond it the connection is closed.
MAX_DISCARD_BYTES = 64 * 1024 * 1024
READINESS_TIMEOUT_SECONDS = 2.0
# A scrape waits this long for the outbox's figures, then answers without them.
BACKLOG_TIMEOUT_SECONDS = 2.0


JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def json_response(payload: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=json_codec.dumps(payload),
        status=status,
        headers={"Content-Type": JSON_CONTENT_TYPE},
    )


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """Return the body, or None (after discarding it) when it is larger than ``limit``.

    A body sent with a Content-Encoding is decoded (``rpc_server.http.content_encoding``);
    the limit holds as sent and as decoded. Raises RequestRefused (415, 400) for a
    coding other than gzip or deflate, or a body that does not decode.

    The body must arrive within ``RPC_SERVER_READ_TIMEOUT``; a client's fault on the way
    (too slow, gone, broken framing) raises an HTTP answer (``rpc_server.server.client_faults``).
    """
    content, length = request.content, request.content_length
    if (
        length is not None
        and 0 < length <= limit
        and content.is_eof()
        and content.exception() is None
        and content_encoding.coding_of(request) is None
    ):
        # The whole body came with the headers (a usual call): nothing to wait for, and
        # no fault of the client's left to meet on the way.
        return content.read_nowait(length)
    async with receiving_body(request, request.app[SETTINGS].read_timeout):
        return await _read_body(request, limit)


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    coding = content_encoding.coding_of(request)
    length = request.content_length
    if coding is not None and not (length is not None and length > limit):
        try:
            return await content_encoding.read_decoded(request.content.iter_any(), coding, limit)
        except content_encoding.BodyTooLarge:
            await _discard(request)
            return None
    if length is not None:
        if length > limit:
            await _discard(request)
            return None
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # the client stopped sending: whatever came is the body
    body = bytearray()  # chunked: read up to the limit
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            await _discard(request)
            return None
    return bytes(body)


async def _discard(request: web.Request) -> None:
    discarded = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        discarded += len(chunk)
        if discarded > MAX_DISCARD_BYTES:
            if request.transport is not None:
                request.transport.close()
            return


async def handle_rpc(request: web.Request) -> web.StreamResponse:
    """POST /rpc: one JSON-RPC 2.0 request, notification or batch."""
    tracing = request.app.get(TRACING)
    if tracing is None:
        return await _handle_rpc(request)
    with tracing.request_span(
        "POST /rpc", tracing.incoming(request.headers), _http_span_attributes(request)
    ) as span:
        request[access_log.TRACE_ID] = tracing.trace_id_of(span)
        response = await _handle_rpc(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


def _http_span_attributes(request: web.Request) -> dict[str, Any]:
    return {"http.request.method": request.method, "url.path": request.path, "http.route": "/rpc"}


async def _handle_rpc(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.observe_request(websocket=False)
    body = await read_body(request, settings.max_body_bytes)
    if body is None:
        if metrics is not None:
            metrics.observe_refusal("body_too_large")
        return json_response(
            invalid_request(f"The body is larger than {settings.max_body_bytes} bytes."),
            status=413,
        )
    try:
        payload = parse(body, max_depth=settings.max_json_depth)
    except ParseError as exc:
        if metrics is not None:
            metrics.observe_refusal("parse_error")
        return json_response(parse_error(str(exc)))
    credentials = read_credentials(request.headers)
    if credentials.ambiguous and metrics is not None:
        metrics.observe_auth_failure("ambiguous_credentials")
    ctx = rpc_context(request, payload, token=credentials.token, ambiguous=credentials.ambiguous)
    result = await answer_payload(request, payload, ctx)
    if result is None:
        return web.Response(status=204)
    return json_response(result)


def rpc_context(
    request: web.Request,
    payload: Any,
    *,
    token: str | None,
    ambiguous: bool = False,
    live: LiveSession | None = None,
) -> RpcContext:
    """The context of the calls of one parsed body (a POST, or a WebSocket text frame)."""
    app, settings = request.app, request.app[SETTINGS]
    uow_factory = app[UOW_FACTORY]
    batch = isinstance(payload, list)
    return RpcContext(
        # A batch's calls read purchases by id together (rpc_server.db.coalescing).
        uow=uow_factory.for_batch() if batch else uow_factory,
        links=app[LINKS],
        payments=app[PAYMENTS],
        token=token,
        ambiguous_credentials=ambiguous,
        client=app[CLIENTS].label_of(request),
        call_timeout=settings.call_timeout,
        call_timer=app[CALL_TIMER],
        max_pending_purchases=settings.max_pending_purchases,
        batch_deadline=BatchDeadline.from_now(settings.batch_timeout) if batch else None,
        service_description=app[OPENRPC].fragment,
        actors=app.get(ACTORS),
        failed_logins=app[FAILED_LOGINS],
        live=live,
        metrics=app.get(METRICS),
        tracing=app.get(TRACING),
    )


async def answer_payload(
    request: web.Request, payload: Any, ctx: RpcContext
) -> dict[str, Any] | list[dict[str, Any]] | None:
    """Answer a parsed body with the app's methods and limits (None: nothing to answer)."""
    settings = request.app[SETTINGS]
    return await answer(
        payload,
        request.app[REGISTRY_KEY],
        ctx,
        max_batch_length=settings.max_batch_length,
        limiter=request.app.get(LIMITER),
        # As many items at once as the pool has connections.
        concurrency=settings.db_pool_size,
    )


async def handle_rpc_websocket(request: web.Request) -> web.StreamResponse:
    """GET /rpc with a WebSocket upgrade: the same methods, plus subscriptions
    (``rpc_server.live.transport``); a GET without the upgrade is refused with 405."""
    budget = request.app[SHUTDOWN].remaining(default=request.app[SETTINGS].shutdown_timeout)

    metrics, tracing = request.app.get(METRICS), request.app.get(TRACING)
    # Each frame's span continues the trace the upgrade request carried.
    parent = None if tracing is None else tracing.incoming(request.headers)

    async def answer_frame(
        connection: LiveConnection, scope: transport.MessageScope, body: bytes
    ) -> None:
        if tracing is None or parent is None:
            await answer_body(connection, scope, body)
            return
        attributes = {"url.path": request.path, "http.route": "/rpc"}
        with tracing.request_span("WebSocket /rpc message", parent, attributes):
            await answer_body(connection, scope, body)

    async def answer_body(
        connection: LiveConnection, scope: transport.MessageScope, body: bytes
    ) -> None:
        # One text frame, answered as POST /rpc answers a body (same checks and codes).
        if metrics is not None:
            metrics.observe_request(websocket=True)
        try:
            payload = parse(body, max_depth=request.app[SETTINGS].max_json_depth)
        except ParseError as exc:
            if metrics is not None:
                metrics.observe_refusal("parse_error")
            connection.send(json_codec.dumps(parse_error(str(exc))))
            return
        ctx = rpc_context(request, payload, token=connection.token, live=scope)
        result = await answer_payload(request, payload, ctx)
        if result is not None:
            connection.send(json_codec.dumps(result))

    return await transport.serve_websocket(
        request, request.app[LIVE], answer_frame, shutdown_budget=budget
    )


async def handle_payment_webhook(request: web.Request) -> web.StreamResponse:
    """POST /webhooks/payments: a signed payment event (``rpc_server.http.webhooks``)."""
    body = await read_body(request, webhooks.MAX_BODY_BYTES)
    if body is None:
        return json_response(
            {"status": "error", "reason": "too_large",
             "message": f"the body is larger than {webhooks.MAX_BODY_BYTES} bytes"},
            status=413,
        )  # fmt: skip
    settings = request.app[SETTINGS]
    try:
        signed = webhooks.signed_payment(request, body)
        async with asyncio.timeout(settings.call_timeout):
            result, purchase = await services.record_payment_event(
                request.app[UOW_FACTORY], request.app[PAYMENTS], signed
            )
    except PaymentNotVerified as exc:
        if (metrics := request.app.get(METRICS)) is not None:
            metrics.observe_payment_refused("webhook", exc.reason)
        answer, status = webhooks.refusal(exc)
        return json_response(answer, status=status)
    except Exception as exc:
        if not (database_unavailable(exc) or isinstance(exc, TimeoutError)):
            raise
        log.warning("payment event not handled, database unavailable: %s", type(exc).__name__)
        return json_response({"status": "unavailable", "message": "retry later"}, status=503)
    return json_response(
        {"status": result.value, "purchase_id": purchase.purchase_id, "state": purchase.state}
    )


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the process runs (liveness; says nothing of the database)."""
    return json_response({"status": "ok"})


async def handle_openrpc(request: web.Request) -> web.Response:
    """GET /openrpc.json: the OpenRPC document (the same as rpc.discover answers)."""
    return json_response(request.app[OPENRPC].fragment)


async def handle_docs(request: web.Request) -> web.Response:
    """GET /docs: the OpenRPC document as a readable HTML reference."""
    return web.Response(
        text=request.app[OPENRPC].html,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": docs_page.CONTENT_SECURITY_POLICY},
    )


async def handle_readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when the database answers and its schema is at the latest
    migration, 503 otherwise (readiness: ``rpc_server.http.readiness``)."""
    readiness = request.app[READINESS]
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            problem = await readiness.problem(request.app[ENGINE])
    except Exception:
        readiness.forget()
        return json_response({"status": "unavailable"}, status=503)
    if problem is not None:
        return json_response({"status": "unavailable", "reason": problem}, status=503)
    return json_response({"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text format, for scrapers on this machine or holding
    the metrics token (``rpc_server.http.metrics_access``)."""
    if not may_scrape(request, request.app[SETTINGS].metrics_token):
        return json_response({"status": "forbidden", "message": REFUSAL}, status=403)
    metrics = request.app[METRICS]
    try:
        async with asyncio.timeout(BACKLOG_TIMEOUT_SECONDS):
            backlog = await services.receipt_backlog(request.app[UOW_FACTORY])
    except Exception as exc:
        if not (database_unavailable(exc) or isinstance(exc, TimeoutError)):
            raise
        backlog = None  # rpc_server_receipt_backlog_up 0 says so
    # Several processes: their files are read and added up, off the event loop.
    if metrics.multiprocess:
        body = await asyncio.to_thread(metrics.exposition, backlog)
    else:
        body = metrics.exposition(backlog)
    return web.Response(body=body, headers={"Content-Type": metrics.content_type})


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = engine_from_settings(settings)
    app[ENGINE] = engine
    metrics = app.get(METRICS)
    app[UOW_FACTORY] = SqlUnitOfWorkFactory(engine, pool_observer=metrics)
    if metrics is not None:
        app[UOW_FACTORY].after_transitions.append(metrics.observe_transitions)
    # Per user, and per client address without a valid token (rpc_server.jsonrpc.rate_limit).
    if (limits := build_rate_limits(settings, engine)) is not None:
        app[LIMITER] = limits
    yield
    await engine.close()


async def deliverer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the receipt deliverer beside the server; on shutdown let it finish its message."""
    deliverer = build_deliverer(
        app[SETTINGS], app[UOW_FACTORY], metrics=app.get(METRICS), tracing=app.get(TRACING)
    )
    app[DELIVERER] = deliverer
    app[UOW_FACTORY].after_receipts.append(deliverer.wake)
    task = asyncio.create_task(deliverer.run(), name="receipt-deliverer")
    yield
    deliverer.stop()
    # Let it finish the message it is sending, but not past the shutdown deadline: a
    # mail server that hangs must not hold the process. An interrupted send is retried
    # when its lease runs out, with the same Message-ID.
    budget = app[SHUTDOWN].remaining(default=app[SETTINGS].shutdown_timeout)
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=budget)
    except TimeoutError:
        log.warning("receipt deliverer still busy at the shutdown deadline; stopping it")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    """Live updates (``rpc_server.live``): the event feed, woken after local commits and,
    on PostgreSQL, by the LISTEN connection; its sockets closed with 1001 at shutdown."""
    hub = transport.LiveHub(app[SETTINGS], app[UOW_FACTORY], app[ENGINE], app.get(METRICS))
    app[LIVE] = hub
    app[UOW_FACTORY].after_events.append(hub.feed.wake)
    await hub.start()
    yield
    await hub.stop()


async def close_websockets(app: web.Application) -> None:
    """On shutdown, after the HTTP drain: close every WebSocket with 1001."""
    if (hub := app.get(LIVE)) is not None:
        await hub.going_away(app[SHUTDOWN].remaining(default=app[SETTINGS].shutdown_timeout))


async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    """Export the spans left at shutdown (the SDK's batch processor holds some)."""
    yield
    if (tracing := app.get(TRACING)) is not None:
        await asyncio.to_thread(tracing.shutdown)


def create_app(
    settings: Settings,
    registry: MethodRegistry = REGISTRY,
    *,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """The application. ``tracer_provider``: trace with it (a test's in-memory exporter)
    instead of as ``RPC_SERVER_TRACING`` says."""
    app = web.Application(
        # Refusals (404, 405, 415, ...) as JSON-RPC errors, inside the request id.
        middlewares=[request_id_middleware, http_errors.error_middleware],
        # Bodies with a Content-Encoding are decoded by rpc_server.http.content_encoding,
        # bounded, not by aiohttp (whose parser answers br/zstd itself, in text).
        handler_args={"auto_decompress": False},
    )
    app.on_response_prepare.append(security_headers.add_security_headers)
    app[SETTINGS] = settings
    app[REGISTRY_KEY] = registry
    app[SHUTDOWN] = Shutdown()
    app[LINKS] = FrontendLinks(settings.frontend_url)
    app[READINESS] = Readiness()
    app[PAYMENTS] = PaymentSignatures(
        settings.payment_keys, tolerance_seconds=settings.payment_tolerance
    )
    # Always: it also remembers unknown tokens (rpc_server.jsonrpc.token_cache).
    app[ACTORS] = ActorCache(settings.token_cache_seconds)
    app[CLIENTS] = ClientAddresses(settings.trusted_proxies)
    app[FAILED_LOGINS] = failed_logins_log()
    app[CALL_TIMER] = CallTimer()
    document = build_document(registry, server_url=settings.rpc_url())
    app[OPENRPC] = ServiceDescription(
        document, docs_page.render(document), json_codec.Fragment(json_codec.dumps(document))
    )
    methods = frozenset(registry.methods)
    if settings.metrics:
        from rpc_server.observability.metrics import Metrics

        app[METRICS] = Metrics(methods)
        app.router.add_get("/metrics", handle_metrics)
    if tracer_provider is not None or settings.tracing:
        from rpc_server.observability.tracing import Tracing, otlp_tracer_provider

        app[TRACING] = Tracing(tracer_provider or otlp_tracer_provider(), methods)
        app.cleanup_ctx.append(tracing_ctx)
    app.cleanup_ctx.append(database_ctx)
    if settings.mail_in_serve:
        app.cleanup_ctx.append(deliverer_ctx)
    app.cleanup_ctx.append(live_ctx)
    app.on_shutdown.append(close_websockets)
    app.router.add_post("/rpc", handle_rpc)
    app.router.add_get("/rpc", handle_rpc_websocket, allow_head=False)
    app.router.add_post("/webhooks/payments", handle_payment_webhook)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/openrpc.json", handle_openrpc)
    app.router.add_get("/docs", handle_docs)
    if settings.cors_origins:
        cors.allow_cors(app, settings.cors_origins)
    return app
