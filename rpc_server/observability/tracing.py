"""OpenTelemetry traces (the optional ``otel`` extra): a span per request, one per call.

Where it sits: ``create_app`` builds a ``Tracing`` when ``RPC_SERVER_TRACING=on`` (or a
test hands it a tracer provider); otherwise nothing here is imported and no span is made.
``handle_rpc`` opens a request span (``POST /rpc``) continuing the client's
``traceparent``; a WebSocket text frame gets one (``WebSocket /rpc message``) continuing
the upgrade request's. The envelope opens a call span inside it for each call, a batch's
items included, named by the method with the attributes of OpenTelemetry's JSON-RPC
conventions (``rpc.system.name``, ``rpc.method`` or ``_OTHER`` with
``rpc.method_original``, ``jsonrpc.protocol.version``, ``jsonrpc.request.id``,
``rpc.response.status_code`` and ``error.type`` for an error). While a call runs its
``traceparent`` is in ``trace_context.current_traceparent``: the receipt outbox stores it,
and the deliverer's span (``receipt.deliver``) continues that trace.

Export: OTLP over HTTP, configured by OpenTelemetry's own variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, …),
in batches off the event loop (the SDK's ``BatchSpanProcessor`` thread).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rpc_server import __version__
from rpc_server.observability.labels import method_label
from rpc_server.observability.trace_context import current_traceparent

SERVICE_NAME = "rpc-server"
_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_tracer_provider() -> TracerProvider:
    """A provider exporting with OTLP/HTTP as the ``OTEL_*`` variables say."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class CallSpan:
    """The span of one call, told how the call ended."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def ended(self, error_code: int | None) -> None:
        if error_code is not None:
            code = str(error_code)
            self.span.set_attribute("rpc.response.status_code", code)
            self.span.set_attribute("error.type", code)
            self.span.set_status(Status(StatusCode.ERROR))


class Tracing:
    """Makes this server's spans with one tracer provider."""

    def __init__(self, provider: TracerProvider, methods: frozenset[str]) -> None:
        self.provider = provider
        self.methods = methods
        self.tracer = provider.get_tracer("rpc_server", __version__)

    @staticmethod
    def incoming(headers: Mapping[str, str]) -> Context:
        """The context a request's ``traceparent`` (and ``tracestate``) header carries."""
        return _PROPAGATOR.extract(headers)

    @staticmethod
    def trace_id_of(span: Span) -> str:
        """``span``'s trace id as 32 hex digits (as log lines show it)."""
        return format_trace_id(span.get_span_context().trace_id)

    @contextmanager
    def request_span(
        self, name: str, parent: Context, attributes: dict[str, Any]
    ) -> Iterator[Span]:
        """A server span for an HTTP request or a WebSocket frame, the current span
        while it lasts."""
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    @contextmanager
    def call_span(self, method: str, request_id: Any, has_id: bool) -> Iterator[CallSpan]:
        """The span of one call (a batch item is one), current while the call runs."""
        label = method_label(method, self.methods)
        attributes: dict[str, Any] = {
            "rpc.system.name": "jsonrpc",
            "rpc.method": label,
            "jsonrpc.protocol.version": "2.0",
        }
        if label != method:
            attributes["rpc.method_original"] = method
        if has_id and request_id is not None:
            attributes["jsonrpc.request.id"] = str(request_id)
        with self.tracer.start_as_current_span(
            label, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            reset = current_traceparent.set(carrier.get("traceparent"))
            try:
                yield CallSpan(span)
            finally:
                current_traceparent.reset(reset)

    @contextmanager
    def receipt_span(self, traceparent: str | None, outbox_id: int) -> Iterator[Span]:
        """The span of one receipt's delivery, in the trace of the call that queued it
        (a new trace when that call was not traced)."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else Context()
        with self.tracer.start_as_current_span(
            "receipt.deliver",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"rpc_server.outbox_id": outbox_id},
        ) as span:
            yield span

    def shutdown(self) -> None:
        """Export what is left and stop the exporter (at the app's cleanup)."""
        self.provider.shutdown()


def trace_id_of_current_span() -> str | None:
    """The current span's trace id as 32 hex digits (None: no span is recording)."""
    from opentelemetry.trace import get_current_span

    context = get_current_span().get_span_context()
    return format_trace_id(context.trace_id) if context.is_valid else None


# A log line's trace id outside any span.
NO_TRACE_ID = "-"


class TraceIdFilter(logging.Filter):
    """Adds ``trace_id`` to every record: the trace of the span current where the line
    was logged (32 hex digits), or ``-`` outside any span, so that a request's log lines
    and its spans join up. A record that already carries one (``extra={"trace_id": …}``,
    e.g. a line logged after its span ended) keeps it. Installed on the log handlers by
    ``log_output.configure_logging(..., trace_ids=True)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id_of_current_span() or NO_TRACE_ID
        return True
