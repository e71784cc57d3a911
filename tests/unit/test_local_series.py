"""One process's series in plain numbers (rpc_server.observability.local_series) are
rendered exactly as prometheus-client's own series would be, for any observations."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from rpc_server.observability.local_series import LocalCounter, LocalGauge, LocalHistogram
from rpc_server.observability.metrics import (
    BATCH_SIZE_BUCKETS,
    CALL_DURATION_BUCKETS,
    POOL_WAIT_BUCKETS,
    Metrics,
)

LABEL_VALUES = st.sampled_from(["purchase.get", "purchase.fulfill", "_OTHER", "ok", "-32001", ""])
BUCKETS = st.sampled_from([CALL_DURATION_BUCKETS, BATCH_SIZE_BUCKETS, POOL_WAIT_BUCKETS])
AMOUNTS = st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, float("inf"), *CALL_DURATION_BUCKETS, *BATCH_SIZE_BUCKETS]),
    st.integers(min_value=0, max_value=2000),
)


# As Metrics does: no ``*_created`` series, which local series never have.
disable_created_metrics()  # type: ignore[no-untyped-call]


def rendered(series: Any) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(series)
    return generate_latest(registry)


def prometheus(kind: Any, *args: Any, **kwargs: Any) -> tuple[Any, CollectorRegistry]:
    registry = CollectorRegistry(auto_describe=True)
    return kind(*args, registry=registry, **kwargs), registry


@settings(max_examples=200, deadline=None)
@given(
    labelled=st.booleans(),
    observations=st.lists(st.tuples(LABEL_VALUES, LABEL_VALUES, AMOUNTS), max_size=40),
    buckets=BUCKETS,
)
def test_a_histogram_renders_as_prometheus_clients(
    labelled: bool, observations: list[tuple[str, str, float]], buckets: tuple[float, ...]
) -> None:
    names = ["method", "outcome"] if labelled else []
    local = LocalHistogram("h_seconds", "A histogram.", names, buckets=buckets)
    theirs, registry = prometheus(Histogram, "h_seconds", "A histogram.", names, buckets=buckets)
    for method, outcome, amount in observations:
        if labelled:
            local.labels(method, outcome).observe(amount)
            theirs.labels(method, outcome).observe(amount)
        else:
            local.observe(amount)
            theirs.observe(amount)
    assert rendered(local) == generate_latest(registry)


@settings(max_examples=200, deadline=None)
@given(
    labelled=st.booleans(),
    increments=st.lists(st.tuples(LABEL_VALUES, AMOUNTS.filter(lambda a: a < 1e300)), max_size=40),
)
def test_a_counter_renders_as_prometheus_clients(
    labelled: bool, increments: list[tuple[str, float]]
) -> None:
    names = ["reason"] if labelled else []
    local = LocalCounter("c", "A counter.", names)
    theirs, registry = prometheus(Counter, "c", "A counter.", names)
    for reason, amount in increments:
        (local.labels(reason) if labelled else local).inc(amount)
        (theirs.labels(reason) if labelled else theirs).inc(amount)
    assert rendered(local) == generate_latest(registry)


@settings(max_examples=200, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["inc", "dec", "set"]), st.integers(-1000, 1000)), max_size=40
    )
)
def test_a_gauge_renders_as_prometheus_clients(operations: list[tuple[str, int]]) -> None:
    local = LocalGauge("g", "A gauge.")
    theirs, registry = prometheus(Gauge, "g", "A gauge.")
    for operation, amount in operations:
        getattr(local, operation)(amount)
        getattr(theirs, operation)(amount)
    assert rendered(local) == generate_latest(registry)


def test_mistakes_are_refused_as_prometheus_client_refuses_them() -> None:
    with pytest.raises(ValueError):
        LocalCounter("c", "A counter.").inc(-1)
    with pytest.raises(ValueError):
        LocalCounter("c", "A counter.", ["a", "b"]).labels("only one")
    with pytest.raises(ValueError):
        LocalHistogram("h", "A histogram.", buckets=(2.0, 1.0))  # not sorted


def test_one_process_metrics_use_plain_numbers_and_render_every_family() -> None:
    metrics = Metrics(["purchase.get"])
    assert isinstance(metrics.calls, LocalCounter)
    assert isinstance(metrics.call_duration, LocalHistogram)
    assert isinstance(metrics.pool_in_use, LocalGauge)
    metrics.observe_call("purchase.get", "ok", 0.003)
    metrics.observe_call("purchase.get", "ok", 0.02)
    metrics.observe_request(websocket=False)
    metrics.checked_out(0.0002)
    text = metrics.exposition(None).decode()
    assert 'rpc_server_calls_total{method="purchase.get",outcome="ok"} 2.0' in text
    assert (
        'rpc_server_call_duration_seconds_bucket{le="0.005",method="purchase.get",outcome="ok"} 1.0'
        in text
    )
    assert 'rpc_server_call_duration_seconds_count{method="purchase.get",outcome="ok"} 2.0' in text
    assert 'rpc_server_requests_total{transport="http"} 1.0' in text
    assert 'rpc_server_requests_total{transport="websocket"} 0.0' in text
    assert "rpc_server_db_connections_in_use 1.0" in text
    assert 'rpc_server_db_pool_wait_seconds_bucket{le="0.001"} 1.0' in text
    assert "process_resident_memory_bytes" in text
