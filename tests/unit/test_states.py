"""The fulfillment state table and the evidence table, cell by cell, against the tables
of the issue, and against the tables the module's docstring shows."""

from __future__ import annotations

import re

import pytest

from rpc_server.domain import states
from rpc_server.domain.records import Actor
from rpc_server.domain.states import (
    OUTCOME_EVIDENCE,
    REQUESTABLE_STATES,
    SEES_EVERY_PURCHASE,
    TRANSITIONS,
    Evidence,
    PurchaseState,
    Scope,
    Step,
    evidence_for,
    sources_of,
    step_for,
)
from tests.unit.table import (
    CANCELED,
    CELLS,
    EVIDENCE_CELLS,
    FAILED,
    FULFILLED,
    ISSUE_EVIDENCE,
    ISSUE_TABLE,
    PENDING,
)


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


# Who may ask for which outcome.


@pytest.mark.parametrize(
    ("scope", "requested", "expected"),
    [(scope, requested, evidence) for (scope, requested), evidence in EVIDENCE_CELLS],
    ids=[f"{scope}->{requested}" for (scope, requested), _ in EVIDENCE_CELLS],
)
def test_evidence_for_matches_the_issue_table(
    scope: Scope, requested: PurchaseState, expected: Evidence
) -> None:
    assert evidence_for(scope, requested) is expected
    assert OUTCOME_EVIDENCE[(scope, requested)] is expected


def test_the_evidence_table_has_a_cell_for_every_scope_and_outcome() -> None:
    assert len(ISSUE_EVIDENCE) == len(Scope) * len(REQUESTABLE_STATES) == 9
    assert OUTCOME_EVIDENCE == ISSUE_EVIDENCE


def test_only_fulfilled_ever_needs_evidence() -> None:
    for (_scope, requested), evidence in OUTCOME_EVIDENCE.items():
        if requested is not FULFILLED:
            assert evidence is Evidence.ANYONE


@pytest.mark.parametrize("scope", list(Scope))
def test_pending_cannot_be_requested_by_any_scope(scope: Scope) -> None:
    with pytest.raises(ValueError, match="pending cannot be requested"):
        evidence_for(scope, PENDING)


def test_staff_and_payments_see_every_purchase_buyers_their_own() -> None:
    assert {Scope.STAFF, Scope.PAYMENTS} == SEES_EVERY_PURCHASE
    buyer, staff, payments = (Actor(1, "a@example.com", scope) for scope in Scope)
    assert (buyer.scope, staff.scope, payments.scope) == (
        Scope.BUYER,
        Scope.STAFF,
        Scope.PAYMENTS,
    )
    assert [a.sees_every_purchase for a in (buyer, staff, payments)] == [False, True, True]
    assert [a.is_staff for a in (buyer, staff, payments)] == [False, True, False]
    assert Actor(1, "a@example.com").scope is Scope.BUYER  # the default


def test_scope_values_are_the_documented_names() -> None:
    assert [scope.value for scope in Scope] == ["buyer", "staff", "payments"]


# The tables in the module's docstring are the tables in the code.


def docstring_table(header: str) -> tuple[list[str], list[list[str]]]:
    """The column names and the rows (cells stripped) of the docstring table whose first
    header cell starts with ``header``."""
    doc = states.__doc__
    assert doc is not None
    lines = doc.splitlines()
    [start] = [n for n, line in enumerate(lines) if line.startswith(f"| {header}")]
    assert re.fullmatch(r"\|(---\|)+", lines[start + 1])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    columns = [cell.strip() for cell in lines[start].strip("|").split("|")][1:]
    return columns, rows


def test_the_docstring_shows_the_transition_table() -> None:
    columns, rows = docstring_table("current")
    shown = {}
    for current, *cells in rows:
        for requested, cell in zip(columns, cells, strict=True):
            shown[(PurchaseState(current), PurchaseState(requested))] = Step(
                cell.split()[0].lower()
            )
    assert shown == TRANSITIONS


def evidence_in(cell: str) -> Evidence:
    words = set(re.findall(r"[A-Z]{2,}", cell))
    if words == {"PROOF", "COMP"}:
        return Evidence.PROOF_OR_COMP
    [word] = words
    return Evidence(word.lower())


def test_the_docstring_shows_the_evidence_table() -> None:
    columns, rows = docstring_table("scope")
    assert len(rows) == len(Scope)
    shown = {}
    for scope, *cells in rows:
        for requested, cell in zip(columns, cells, strict=True):
            shown[(Scope(scope.split()[0]), PurchaseState(requested))] = evidence_in(cell)
    assert shown == OUTCOME_EVIDENCE
