"""Prometheus metrics: every series this server exports, and their exposition at /metrics.

Where it sits: ``create_app`` builds one ``Metrics`` (unless ``RPC_SERVER_METRICS=off``)
and hands it to what it measures: the envelope counts each call (a batch's items one by
one) and each body, the unit of work each state change, the deliverer each receipt
attempt, the live hub its sockets, the database layer its pool. Nothing here is global:
each app has its own series (tests build many apps in one process).

Several processes (``serve --workers N``): prometheus-client's multiprocess mode. The
arbiter sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before it forks
(``rpc_server.server.worker_pool``); each worker writes its values to memory-mapped files
there, and whichever worker answers a scrape adds them all up (``MultiProcessCollector``).
Gauges of a process (sockets, connections in use) are summed over the live processes
only (``livesum``); a dead worker's files are marked dead by the arbiter. One process
(``serve``) keeps its values in plain numbers of its own (``local_series``: no lock per
update) and also exports the ``process_*`` series.

Label values come from a closed set whatever a client sends: a method is a registered
name or ``_OTHER``, an outcome ``ok`` or an error code this server answers with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from rpc_server.domain.outbox import ReceiptBacklog
from rpc_server.observability.labels import MULTIPROCESS_DIR_VARIABLE, method_label
from rpc_server.observability.local_series import LocalCounter, LocalGauge, LocalHistogram

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# OpenTelemetry's advisory buckets for rpc.server.call.duration, in seconds.
CALL_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
POOL_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
# Why a body or a request object was refused before any method ran (the last two: a
# connection past RPC_SERVER_MAX_CONNECTIONS answered 503, a request that did not arrive
# within RPC_SERVER_READ_TIMEOUT answered 408, by rpc_server.server.connection_limits).
REFUSAL_REASONS = (
    "body_too_large", "parse_error", "empty_batch", "batch_too_long", "invalid_request",
    "too_many_connections", "read_timeout",
)  # fmt: skip


def multiprocess_dir() -> str | None:
    """The multiprocess mode's directory, when this process runs in that mode."""
    return os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None


class Metrics:
    """The series of one app; methods record, ``exposition`` renders them."""

    # What ``generate_latest`` writes: the Prometheus text format 0.0.4.
    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, methods: Iterable[str]) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # No ``*_created`` series beside each counter and histogram: they double what a
        # scrape carries and no query here needs them (prometheus-client's own switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # Multiprocess mode: values live in the directory's files, not in a registry.
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        self.methods = frozenset(methods)
        self.call_duration = self._histogram(
            "rpc_server_call_duration_seconds",
            "Duration of JSON-RPC calls (each batch item is one call), by method and "
            "outcome (ok, or the error code answered).",
            ["method", "outcome"],
            buckets=CALL_DURATION_BUCKETS,
        )
        self.calls = self._counter(
            "rpc_server_calls",
            "JSON-RPC calls (each batch item is one call; notifications included), by "
            "method and outcome.",
            ["method", "outcome"],
        )
        self.requests = self._counter(
            "rpc_server_requests",
            "JSON-RPC bodies received: HTTP POST bodies and WebSocket text frames.",
            ["transport"],
        )
        self.batch_size = self._histogram(
            "rpc_server_batch_size",
            "Request objects per batch (batches that were run).",
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.refused = self._counter(
            "rpc_server_requests_refused",
            "Bodies (or request objects, for invalid_request) refused before any method "
            "ran, by reason.",
            ["reason"],
        )
        self.rate_limited = self._counter(
            "rpc_server_rate_limited_calls",
            "Calls refused by the rate limits (answered 429, not run).",
        )
        self.auth_failures = self._counter(
            "rpc_server_authentication_failures",
            "Requests whose credentials did not authenticate, by reason.",
            ["reason"],
        )
        self.receipt_attempts = self._counter(
            "rpc_server_receipt_delivery_attempts",
            "Receipt sends attempted by this server's deliverer, by outcome (sent; retry: "
            "failed, will be retried; dead: failed for good).",
            ["outcome"],
        )
        self.payments_refused = self._counter(
            "rpc_server_payment_events_refused",
            "Payment events and proofs refused, by reason and by where they came from "
            "(webhook, or a proof in purchase.fulfill).",
            ["source", "reason"],
        )
        self.transitions = self._counter(
            "rpc_server_purchase_transitions",
            "Purchase state changes committed by this server, by transition.",
            ["from_state", "to_state"],
        )
        self.websockets = self._gauge(
            "rpc_server_websocket_connections",
            "Open WebSocket connections.",
        )
        self.subscriptions = self._gauge(
            "rpc_server_websocket_subscriptions",
            "Open purchase subscriptions on WebSocket connections.",
        )
        self.pool_in_use = self._gauge(
            "rpc_server_db_connections_in_use",
            "Database connections checked out of the pool.",
        )
        self.pool_wait = self._histogram(
            "rpc_server_db_pool_wait_seconds",
            "Time to check a connection out of the database pool (waits included).",
            buckets=POOL_WAIT_BUCKETS,
        )
        if self.registry is not None:
            ProcessCollector(registry=self.registry)
        # Every series a label set can reach, made once: the hot path looks a child up
        # in a dict instead of calling ``labels``, and a scrape shows zeros rather than
        # nothing for what has not happened yet.
        self._call_series: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._http_requests = self.requests.labels("http")
        self._ws_requests = self.requests.labels("websocket")
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)

    # One process keeps its values in plain numbers (rpc_server.observability.local_series);
    # several keep them in prometheus-client's multiprocess files.

    def _counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> Counter | LocalCounter:
        if self.registry is None:
            return Counter(name, documentation, labelnames, registry=None)
        series = LocalCounter(name, documentation, labelnames)
        self.registry.register(series)
        return series

    def _gauge(self, name: str, documentation: str) -> Gauge | LocalGauge:
        if self.registry is None:
            # Summed over the live processes only (a dead worker's connections are gone).
            return Gauge(name, documentation, registry=None, multiprocess_mode="livesum")
        series = LocalGauge(name, documentation)
        self.registry.register(series)
        return series

    def _histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram | LocalHistogram:
        if self.registry is None:
            return Histogram(name, documentation, labelnames, buckets=buckets, registry=None)
        series = LocalHistogram(name, documentation, labelnames, buckets=buckets)
        self.registry.register(series)
        return series

    def method_label(self, method: str) -> str:
        """The label of a method name: itself if registered, else ``_OTHER``."""
        return method_label(method, self.methods)

    def observe_call(self, method: str, outcome: str, seconds: float) -> None:
        """One call ended: ``method`` already a label (``method_label``)."""
        series = self._call_series.get((method, outcome))
        if series is None:
            series = self.call_duration.labels(method, outcome), self.calls.labels(method, outcome)
            self._call_series[(method, outcome)] = series
        duration, count = series
        duration.observe(seconds)
        count.inc()

    def observe_request(self, *, websocket: bool) -> None:
        (self._ws_requests if websocket else self._http_requests).inc()

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_refusal(self, reason: str, count: int = 1) -> None:
        self.refused.labels(reason).inc(count)

    def observe_rate_limited(self, count: int) -> None:
        self.rate_limited.inc(count)

    def observe_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def observe_receipt_attempt(self, outcome: str) -> None:
        self.receipt_attempts.labels(outcome).inc()

    def observe_payment_refused(self, source: str, reason: str) -> None:
        self.payments_refused.labels(source, reason).inc()

    def observe_transitions(self, transitions: Sequence[tuple[str | None, str]]) -> None:
        for from_state, to_state in transitions:
            self.transitions.labels(from_state or "none", to_state).inc()

    # --- the database pool (rpc_server.db.connection.PoolObserver) ------------------

    def checked_out(self, waited: float) -> None:
        self.pool_wait.observe(waited)
        self.pool_in_use.inc()

    def given_back(self) -> None:
        self.pool_in_use.dec()

    # --- the live hub ---------------------------------------------------------------

    def websocket_count(self, count: int) -> None:
        self.websockets.set(count)

    def subscription_count(self, count: int) -> None:
        self.subscriptions.set(count)

    def exposition(self, backlog: ReceiptBacklog | None) -> bytes:
        """The text format of every series, with the outbox's (None: the database did
        not answer; ``rpc_server_receipt_backlog_up`` says so)."""
        registry = CollectorRegistry(auto_describe=False)
        if self.registry is None:
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Everything(self.registry))
        registry.register(_Backlog(backlog))
        return generate_latest(registry)


class _Everything:
    """A collector that yields what another registry holds (the app's own series)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self._registry.collect())


class _Backlog:
    """The receipt outbox's state, read from the database for this scrape."""

    def __init__(self, backlog: ReceiptBacklog | None) -> None:
        self._backlog = backlog

    def collect(self) -> Iterator[Metric]:
        backlog = self._backlog
        yield GaugeMetricFamily(
            "rpc_server_receipt_backlog_up",
            "1 when this scrape could read the receipt outbox from the database, else 0.",
            value=0 if backlog is None else 1,
        )
        if backlog is None:
            return
        receipts = GaugeMetricFamily(
            "rpc_server_receipts",
            "Receipts in the outbox not sent: pending (to send or retry) and dead "
            "(failed for good; see rpc-server mail-retry). Database-wide.",
            labels=["status"],
        )
        receipts.add_metric(["pending"], backlog.pending)
        receipts.add_metric(["dead"], backlog.dead)
        yield receipts
        oldest = backlog.oldest_pending_at
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        yield GaugeMetricFamily(
            "rpc_server_receipt_oldest_pending_age_seconds",
            "Age of the oldest pending receipt (0 when none is pending). Database-wide.",
            value=max(0.0, age),
        )
