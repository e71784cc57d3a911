"""The fulfillment state table, cell by cell, against the table of the issue."""

from __future__ import annotations

import pytest

from rpc_server.domain.states import (
    REQUESTABLE_STATES,
    TRANSITIONS,
    PurchaseState,
    Step,
    sources_of,
    step_for,
)
from tests.unit.table import CANCELED, CELLS, FAILED, FULFILLED, ISSUE_TABLE, PENDING


@pytest.mark.parametrize(
    ("current", "requested", "expected"),
    [(current, requested, step) for (current, requested), step in CELLS],
    ids=[f"{current}->{requested}" for (current, requested), _ in CELLS],
)
def test_step_for_matches_the_issue_table(
    current: PurchaseState, requested: PurchaseState, expected: Step
) -> None:
    assert step_for(current, requested) is expected


def test_the_table_has_exactly_the_twelve_cells_of_the_issue() -> None:
    assert len(ISSUE_TABLE) == 12
    assert TRANSITIONS == ISSUE_TABLE


@pytest.mark.parametrize("current", list(PurchaseState))
def test_requesting_pending_raises_value_error(current: PurchaseState) -> None:
    with pytest.raises(ValueError, match="pending cannot be requested"):
        step_for(current, PurchaseState.PENDING)


def test_requestable_states_are_the_three_outcomes() -> None:
    assert REQUESTABLE_STATES == (FULFILLED, FAILED, CANCELED)
    assert PENDING not in REQUESTABLE_STATES


@pytest.mark.parametrize(
    ("requested", "sources"),
    [
        (FULFILLED, {PENDING, FAILED}),
        (FAILED, {PENDING}),
        (CANCELED, {PENDING, FAILED}),
        (PENDING, set()),
    ],
)
def test_sources_of(requested: PurchaseState, sources: set[PurchaseState]) -> None:
    assert sources_of(requested) == frozenset(sources)
    assert isinstance(sources_of(requested), frozenset)


@pytest.mark.parametrize("requested", REQUESTABLE_STATES)
def test_sources_are_exactly_the_apply_cells(requested: PurchaseState) -> None:
    expected = {
        current
        for (current, target), step in ISSUE_TABLE.items()
        if target is requested and step is Step.APPLY
    }
    assert sources_of(requested) == expected
    # A state is never a source of itself: repeating a request must never re-apply it.
    assert requested not in sources_of(requested)


def test_fulfilled_and_canceled_are_terminal() -> None:
    for terminal in (FULFILLED, CANCELED):
        for requested in REQUESTABLE_STATES:
            assert step_for(terminal, requested) is not Step.APPLY
