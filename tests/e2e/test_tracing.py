"""OpenTelemetry spans over HTTP (issue 19): a request span, a span per call, receipts in
the trace of the call that queued them.

Each test builds the app with a tracer provider of its own whose spans go to an in-memory
exporter as they end (``SimpleSpanProcessor``), and reads them there: names, kinds,
attributes, status and how they are parented. ``POST /rpc`` is one SERVER span
continuing the client's ``traceparent``; each call (a batch's items included) is a
child span named by its method (``_OTHER`` when unknown) with OpenTelemetry's JSON-RPC
attributes; ``purchase.fulfill`` stores its ``traceparent`` in the outbox row, and the
deliverer's ``receipt.deliver`` span continues it. Without a provider and with tracing
off no span is made and nothing is stored.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.app import TRACING, create_app
from rpc_server.config import Settings
from tests.conftest import World
from tests.e2e.conftest import (
    METHOD_NOT_FOUND,
    PAYMENT_NOT_VERIFIED,
    notification_object,
    request_object,
    send,
)
from tests.e2e.test_payments import create, fulfill, result_of
from tests.integration.smtp_server import eventually
from tests.payments import proof_for

# A client's trace context, as a W3C ``traceparent`` header carries it.
SENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SENT_SPAN_ID = "00f067aa0ba902b7"
SENT_TRACEPARENT = f"00-{SENT_TRACE_ID}-{SENT_SPAN_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    """The test's provider; the app shuts it down at its cleanup."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


TracedClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def traced_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    provider: TracerProvider,
) -> TracedClient:
    """``await traced_client()``: a client over an app tracing with the test's provider.

    Every HTTP call of a test goes through it: another app on the same database would
    run a deliverer of its own, which could send a receipt untraced."""

    async def build(*, settings: Settings = settings) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(settings, tracer_provider=provider))

    return build


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """A span's trace id and span id as 32 and 16 hex digits."""
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def traceparent_of(span: ReadableSpan) -> str:
    """The ``traceparent`` header value that names ``span`` as a parent."""
    assert span.context is not None
    trace_id, span_id = hex_ids(span)
    return f"00-{trace_id}-{span_id}-{span.context.trace_flags:02x}"


def parent_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.parent is not None, span.name
    return f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"


def only_request_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [request_span] = named(exporter, "POST /rpc")
    assert request_span.kind is SpanKind.SERVER
    assert request_span.attributes is not None
    assert request_span.attributes["http.request.method"] == "POST"
    assert request_span.attributes["http.route"] == "/rpc"
    return request_span


def call_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.attributes and span.attributes.get("rpc.system.name") == "jsonrpc"
    ]


# --- a span per request, one per call -----------------------------------------------------


async def test_a_batch_of_three_calls_gives_three_call_spans_under_one_request_span(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    missing = "00000000-0000-4000-8000-000000000000"
    batch = [
        request_object("course.list", id="a"),
        request_object("purchase.get", {"purchase_id": missing}, id=2),
        request_object("no.such.method", id=3),
    ]
    reply = await send(client, batch, token=world.alice.token)
    assert reply.status == 200
    answers = {answer["id"]: answer for answer in reply.json}
    assert "result" in answers["a"], answers
    failing_code = answers[2]["error"]["code"]
    assert answers[3]["error"]["code"] == METHOD_NOT_FOUND

    request_span = only_request_span(exporter)
    assert request_span.attributes is not None
    assert request_span.attributes["http.response.status_code"] == 200
    assert request_span.parent is None  # no traceparent sent: a new trace
    trace_id, request_span_id = hex_ids(request_span)
    spans = call_spans(exporter)
    assert sorted(span.name for span in spans) == ["_OTHER", "course.list", "purchase.get"]
    for span in spans:
        assert parent_ids(span) == (trace_id, request_span_id), span.name
        assert span.kind is SpanKind.SERVER
        assert span.attributes is not None
        assert span.attributes["jsonrpc.protocol.version"] == "2.0"
    by_name = {span.name: span for span in spans}

    listed = by_name["course.list"]
    assert dict(listed.attributes or {}) == {
        "rpc.system.name": "jsonrpc",
        "rpc.method": "course.list",
        "jsonrpc.protocol.version": "2.0",
        "jsonrpc.request.id": "a",
    }
    assert listed.status.status_code is StatusCode.UNSET

    failed = by_name["purchase.get"]
    assert failed.attributes is not None
    assert failed.attributes["rpc.method"] == "purchase.get"
    assert failed.attributes["jsonrpc.request.id"] == "2"  # a number, as a string
    assert failed.attributes["rpc.response.status_code"] == str(failing_code)
    assert failed.attributes["error.type"] == str(failing_code)
    assert failed.status.status_code is StatusCode.ERROR

    unknown = by_name["_OTHER"]
    assert unknown.attributes is not None
    assert unknown.attributes["rpc.method"] == "_OTHER"
    assert unknown.attributes["rpc.method_original"] == "no.such.method"
    assert unknown.attributes["jsonrpc.request.id"] == "3"
    assert unknown.attributes["error.type"] == str(METHOD_NOT_FOUND)
    assert unknown.status.status_code is StatusCode.ERROR
    assert "rpc.method_original" not in (listed.attributes or {})


async def test_a_traceparent_sent_in_is_continued(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    reply = await send(
        client,
        [request_object("course.list", id=1), request_object("course.list", id=2)],
        token=world.alice.token,
        headers={"traceparent": SENT_TRACEPARENT},
    )
    assert reply.status == 200

    request_span = only_request_span(exporter)
    assert hex_ids(request_span)[0] == SENT_TRACE_ID
    assert parent_ids(request_span) == (SENT_TRACE_ID, SENT_SPAN_ID)
    assert request_span.parent is not None and request_span.parent.is_remote
    spans = call_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        assert hex_ids(span)[0] == SENT_TRACE_ID
        assert parent_ids(span) == hex_ids(request_span)


async def test_a_malformed_traceparent_starts_a_new_trace(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    reply = await send(
        client,
        request_object("course.list"),
        token=world.alice.token,
        headers={"traceparent": f"00-{SENT_TRACE_ID}-not-a-span-id-01"},
    )
    assert reply.status == 200
    request_span = only_request_span(exporter)
    assert request_span.parent is None
    assert hex_ids(request_span)[0] != SENT_TRACE_ID


async def test_a_notification_gets_a_span_and_an_error_marks_it(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    reply = await send(
        client,
        [notification_object("course.list"), notification_object("no.such.method")],
        token=world.alice.token,
    )
    assert reply.status == 204  # only notifications: nothing to answer
    assert reply.text == ""

    request_span = only_request_span(exporter)
    assert request_span.attributes is not None
    assert request_span.attributes["http.response.status_code"] == 204
    by_name = {span.name: span for span in call_spans(exporter)}
    assert set(by_name) == {"course.list", "_OTHER"}
    for span in by_name.values():
        assert span.attributes is not None
        assert "jsonrpc.request.id" not in span.attributes  # a notification has none
        assert parent_ids(span) == hex_ids(request_span)
    assert by_name["course.list"].status.status_code is StatusCode.UNSET
    unknown = by_name["_OTHER"]
    assert unknown.status.status_code is StatusCode.ERROR
    assert unknown.attributes is not None
    assert unknown.attributes["error.type"] == str(METHOD_NOT_FOUND)
    assert unknown.attributes["rpc.method_original"] == "no.such.method"


async def test_a_null_id_is_not_an_attribute_and_a_refused_call_is_an_error(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    purchase = await create(client, world.alice.token)
    exporter.clear()
    # A buyer fulfilling without a payment proof is refused (402): an error span.
    reply = await send(
        client,
        request_object(
            "purchase.fulfill",
            {"purchase_id": purchase["purchase_id"], "purchase_state": "fulfilled"},
            id=None,
        ),
        token=world.alice.token,
    )
    assert reply.json["error"]["code"] == PAYMENT_NOT_VERIFIED
    [span] = call_spans(exporter)
    assert span.name == "purchase.fulfill"
    assert span.attributes is not None
    assert "jsonrpc.request.id" not in span.attributes
    assert span.attributes["rpc.response.status_code"] == str(PAYMENT_NOT_VERIFIED)
    assert span.attributes["error.type"] == str(PAYMENT_NOT_VERIFIED)
    assert span.status.status_code is StatusCode.ERROR


# --- a receipt is delivered in the trace of the call that queued it ----------------------


async def outbox_trace_contexts(engine: AsyncEngine) -> list[str | None]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT trace_context FROM receipt_outbox"))
        return [row[0] for row in rows]


def eml_files(settings: Settings) -> list[Path]:
    return sorted(Path(settings.mail_dir).glob("*.eml"))


async def test_a_receipt_is_delivered_in_the_trace_of_the_fulfilling_call(
    traced_client: TracedClient,
    exporter: InMemorySpanExporter,
    settings: Settings,
    world: World,
    engine: AsyncEngine,
) -> None:
    assert settings.mail_in_serve and settings.smtp_url is None  # .eml files in mail_dir
    client = await traced_client()
    purchase = await create(client, world.alice.token)
    reply = await fulfill(
        client,
        world.alice.token,
        purchase["purchase_id"],
        proof=proof_for(purchase),
        id=41,
        # The client's trace: the delivery joins it too.
    )
    assert result_of(reply)["purchase"]["state"] == "fulfilled"

    [fulfil_span] = named(exporter, "purchase.fulfill")
    assert fulfil_span.attributes is not None
    assert fulfil_span.attributes["jsonrpc.request.id"] == "41"
    assert fulfil_span.status.status_code is StatusCode.UNSET
    trace_id, fulfil_span_id = hex_ids(fulfil_span)

    # The outbox row holds the call's own traceparent (not the request span's).
    assert await outbox_trace_contexts(engine) == [traceparent_of(fulfil_span)]

    await eventually(lambda: _some(eml_files(settings)), what="the receipt's .eml file")
    deliver = await eventually(
        lambda: _some(named(exporter, "receipt.deliver")), what="the receipt.deliver span"
    )
    [deliver_span] = deliver
    assert deliver_span.kind is SpanKind.CONSUMER
    assert hex_ids(deliver_span)[0] == trace_id
    assert parent_ids(deliver_span) == (trace_id, fulfil_span_id)
    assert deliver_span.attributes is not None
    assert deliver_span.attributes["rpc_server.receipt.outcome"] == "sent"
    outbox_id = await _scalar(engine, "SELECT id FROM receipt_outbox")
    assert deliver_span.attributes["rpc_server.outbox_id"] == outbox_id
    [eml] = eml_files(settings)
    assert purchase["purchase_id"] in eml.read_text()


async def test_a_receipt_continues_a_trace_the_client_started(
    traced_client: TracedClient,
    exporter: InMemorySpanExporter,
    settings: Settings,
    world: World,
    engine: AsyncEngine,
) -> None:
    client = await traced_client()
    purchase = await create(client, world.alice.token)
    params = {
        "purchase_id": purchase["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(purchase),
    }
    reply = await send(
        client,
        request_object("purchase.fulfill", params),
        token=world.alice.token,
        headers={"traceparent": SENT_TRACEPARENT},
    )
    assert result_of(reply)["purchase"]["state"] == "fulfilled"
    [fulfil_span] = named(exporter, "purchase.fulfill")
    assert hex_ids(fulfil_span)[0] == SENT_TRACE_ID
    [stored] = await outbox_trace_contexts(engine)
    assert stored == traceparent_of(fulfil_span)
    assert stored.startswith(f"00-{SENT_TRACE_ID}-")
    [deliver_span] = await eventually(
        lambda: _some(named(exporter, "receipt.deliver")), what="the receipt.deliver span"
    )
    assert parent_ids(deliver_span) == hex_ids(fulfil_span)


# --- tracing off ---------------------------------------------------------------------------


@pytest.fixture
def sdk_spans_started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the spans any OpenTelemetry SDK tracer starts during the test."""
    started: list[str] = []
    start_span = Tracer.start_span

    def recording(self: Tracer, name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(name)
        return start_span(self, name, *args, **kwargs)

    monkeypatch.setattr(Tracer, "start_span", recording)
    return started


async def test_the_spy_sees_the_spans_of_a_traced_app(
    traced_client: TracedClient, sdk_spans_started: list[str], world: World
) -> None:
    """The check the next test relies on: a traced app's spans do pass the spy."""
    client = await traced_client()
    reply = await send(client, request_object("course.list"), token=world.alice.token)
    assert reply.status == 200
    assert sdk_spans_started == ["POST /rpc", "course.list"]


async def test_without_a_provider_and_with_tracing_off_no_span_is_made_and_nothing_stored(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    sdk_spans_started: list[str],
    world: World,
    engine: AsyncEngine,
) -> None:
    assert settings.tracing is False
    app = create_app(settings)
    assert TRACING not in app
    client = await aiohttp_client(app)
    purchase = await create(client, world.alice.token)
    # Even a client's traceparent is not stored: the row records this server's trace.
    params = {
        "purchase_id": purchase["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(purchase),
    }
    reply = await send(
        client,
        [request_object("purchase.fulfill", params), request_object("no.such.method", id=2)],
        token=world.alice.token,
        headers={"traceparent": SENT_TRACEPARENT},
    )
    answers = {answer["id"]: answer for answer in reply.json}
    assert answers[1]["result"]["purchase"]["state"] == "fulfilled"
    assert answers[2]["error"]["code"] == METHOD_NOT_FOUND
    await eventually(lambda: _some(eml_files(settings)), what="the receipt's .eml file")
    await eventually(
        lambda: _scalar(engine, "SELECT count(*) FROM receipt_outbox WHERE status = 'sent'"),
        what="the receipt row marked sent",
    )
    assert await outbox_trace_contexts(engine) == [None]
    assert sdk_spans_started == []


# --- WebSocket frames -----------------------------------------------------------------------


async def test_each_websocket_frame_gets_a_span_continuing_the_upgrade_requests_trace(
    traced_client: TracedClient, exporter: InMemorySpanExporter, world: World
) -> None:
    client = await traced_client()
    ws = await client.ws_connect(
        "/rpc",
        headers={"Authorization": f"Bearer {world.alice.token}", "traceparent": SENT_TRACEPARENT},
    )
    try:
        for id in (1, 2):
            await ws.send_str(json.dumps(request_object("course.list", id=id)))
            answer = json.loads(await ws.receive_str(timeout=5))
            assert answer["id"] == id and "result" in answer, answer
    finally:
        await ws.close()

    frames = named(exporter, "WebSocket /rpc message")
    assert len(frames) == 2
    assert len({hex_ids(frame)[1] for frame in frames}) == 2  # a span per frame
    for frame in frames:
        assert frame.kind is SpanKind.SERVER
        assert parent_ids(frame) == (SENT_TRACE_ID, SENT_SPAN_ID)
    frame_span_ids = {hex_ids(frame)[1] for frame in frames}
    calls = named(exporter, "course.list")
    assert len(calls) == 2
    assert {parent_ids(call)[1] for call in calls} == frame_span_ids
    assert all(hex_ids(call)[0] == SENT_TRACE_ID for call in calls)


# --- helpers ----------------------------------------------------------------------------------


async def _some(values: list[Any]) -> list[Any] | None:
    return values or None


async def _scalar(engine: AsyncEngine, sql: str) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql))).scalar_one()
