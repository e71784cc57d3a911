"""Observability: Prometheus metrics (``metrics``), OpenTelemetry traces (``tracing``, the
``otel`` extra) and the trace context that outbox rows carry (``trace_context``)."""
