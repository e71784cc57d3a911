"""A server process tunes the garbage collector once it serves (``tune_garbage_collector``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from rpc_server.server.serving import GC_YOUNG_THRESHOLD, tune_garbage_collector


@pytest.fixture
def collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_restored")
def test_startup_objects_are_frozen_and_the_young_generation_collected_less_often() -> None:
    gc.set_threshold(700, 11, 12)
    gc.unfreeze()
    startup = [{"built": "at startup"}]  # a container alive when the server is up
    tune_garbage_collector()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)  # older ratios kept
    assert gc.get_freeze_count() > 0
    assert not any(obj is startup for obj in gc.get_objects())  # not scanned any more
    # What is allocated afterwards is collected as before (a cycle is freed).
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
