"""Counters, gauges and histograms of one process, kept in plain Python numbers.

Where it sits: ``Metrics`` (``rpc_server.observability.metrics``) makes its series with
these when the server runs as one process, and with prometheus-client's ``Counter``,
``Gauge`` and ``Histogram`` in the multiprocess mode (``serve --workers N``), whose values
must live in the files every worker writes. The part of prometheus-client's API that
``Metrics`` uses is the same on both: ``labels(...)`` returns a child, and a child (or a
series without labels) has ``inc``, ``dec``, ``set`` or ``observe``.

Why: prometheus-client guards every value with a lock and checks on every call that the
series is observable; a single ``purchase.get`` made eight updates of seven values (the
request counter, the pool's wait histogram's sum and a bucket, its in-use gauge up and
down, the call counter, the call duration's sum and a bucket): 3.5 µs timed alone, and
with metrics off a single ``purchase.get`` on SQLite ran 6 % faster
(tests/benchmarks/profile.md). All these updates come from the event loop's thread, so
here they are plain additions. A scrape reads the numbers through ``collect`` (a
prometheus-client custom collector, registered in the app's registry), which yields the
same families, samples and text as prometheus-client's own series would
(``tests/unit/test_local_series.py`` compares the two on generated observations). A
scrape from another thread would read a snapshot: each series is copied in one step
(``list(dict.items())``) before it is rendered.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


V = TypeVar("V")


class _Series(Generic[V]):
    """What the three kinds share: a name, a help text, label names, and the values by
    label values (a series without labels has one, under ``()``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], V] = {}

    def labels(self, *values: str) -> V:
        """The value of one label set, made on first use (as prometheus-client's)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> V:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        """The family without samples (what a registry checks names against)."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self._children.items()))

    def _families(self, children: list[tuple[tuple[str, ...], V]]) -> Iterator[Metric]:
        raise NotImplementedError


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LocalCounter(_Series[CounterValue]):
    """A counter (exposed as ``<name>_total``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        if not self.labelnames:
            self._only: CounterValue = self.labels()

    def _new_child(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: float = 1) -> None:
        self._only.inc(amount)

    def _families(self, children: list[tuple[tuple[str, ...], CounterValue]]) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in children:
            family.add_metric(values, child.value)
        yield family


class GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class LocalGauge(_Series[GaugeValue]):
    """A gauge without labels (the only kind ``Metrics`` has)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, ())
        self._only = self.labels()

    def _new_child(self) -> GaugeValue:
        return GaugeValue()

    def inc(self, amount: float = 1) -> None:
        self._only.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._only.dec(amount)

    def set(self, value: float) -> None:
        self._only.set(value)

    def _families(self, children: list[tuple[tuple[str, ...], GaugeValue]]) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=())
        for values, child in children:
            family.add_metric(values, child.value)
        yield family


class HistogramValue:
    """One series' bucket counts (not cumulative: each observation adds to one bucket,
    the first whose bound holds it, as prometheus-client does) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1


class LocalHistogram(_Series[HistogramValue]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        # The bounds as prometheus-client checks, completes (+Inf) and writes them
        # (``le``), read from a histogram of its own that nothing registers.
        probe = Histogram(name, documentation, buckets=buckets, registry=None)
        self._les = [
            sample.labels["le"]
            for family in probe.collect()
            for sample in family.samples
            if sample.name.endswith("_bucket")
        ]
        self.bounds = tuple(float(le) for le in self._les)
        if not self.labelnames:
            self._only: HistogramValue = self.labels()

    def _new_child(self) -> HistogramValue:
        return HistogramValue(self.bounds)

    def observe(self, amount: float) -> None:
        self._only.observe(amount)

    def _families(self, children: list[tuple[tuple[str, ...], HistogramValue]]) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in children:
            counts, total = list(child.counts), child.sum  # one snapshot
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, total)
        yield family
