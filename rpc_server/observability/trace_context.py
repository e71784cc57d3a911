"""The W3C trace context of the call under way, for what it leaves behind (outbox rows).

Where it sits: when tracing is on, each call's span (``rpc_server.observability.tracing``)
sets ``current_traceparent`` for the call's duration; the receipt outbox stores it with the
row it adds, and the deliverer continues that trace when it sends the receipt. With
tracing off it stays None and nothing is stored. No OpenTelemetry import here: the
database layer reads it whether the ``otel`` extra is installed or not.
"""

from __future__ import annotations

from contextvars import ContextVar

# A ``traceparent`` header value (``00-<trace id>-<span id>-<flags>``), or None.
current_traceparent: ContextVar[str | None] = ContextVar("traceparent", default=None)
