"""The issue's tables (the state machine, and who may ask for which outcome), written out
independently of the code."""

from rpc_server.domain.states import Evidence, PurchaseState, Scope, Step

PENDING = PurchaseState.PENDING
FULFILLED = PurchaseState.FULFILLED
FAILED = PurchaseState.FAILED
CANCELED = PurchaseState.CANCELED

ISSUE_TABLE: dict[tuple[PurchaseState, PurchaseState], Step] = {
    (PENDING, FULFILLED): Step.APPLY,
    (PENDING, FAILED): Step.APPLY,
    (PENDING, CANCELED): Step.APPLY,
    (FAILED, FULFILLED): Step.APPLY,
    (FAILED, FAILED): Step.REPEAT,
    (FAILED, CANCELED): Step.APPLY,
    (FULFILLED, FULFILLED): Step.REPEAT,
    (FULFILLED, FAILED): Step.CONFLICT,
    (FULFILLED, CANCELED): Step.CONFLICT,
    (CANCELED, FULFILLED): Step.CONFLICT,
    (CANCELED, FAILED): Step.CONFLICT,
    (CANCELED, CANCELED): Step.REPEAT,
}

CELLS = sorted(ISSUE_TABLE.items())
CONFLICT_CELLS = [cell for cell, step in CELLS if step is Step.CONFLICT]

# Who may ask for which outcome, by the scope of the token (the issue's second table).
ISSUE_EVIDENCE: dict[tuple[Scope, PurchaseState], Evidence] = {
    (Scope.BUYER, CANCELED): Evidence.ANYONE,
    (Scope.BUYER, FAILED): Evidence.ANYONE,
    (Scope.BUYER, FULFILLED): Evidence.PROOF,
    (Scope.PAYMENTS, CANCELED): Evidence.ANYONE,
    (Scope.PAYMENTS, FAILED): Evidence.ANYONE,
    (Scope.PAYMENTS, FULFILLED): Evidence.ANYONE,
    (Scope.STAFF, CANCELED): Evidence.ANYONE,
    (Scope.STAFF, FAILED): Evidence.ANYONE,
    (Scope.STAFF, FULFILLED): Evidence.PROOF_OR_COMP,
}
EVIDENCE_CELLS = sorted(ISSUE_EVIDENCE.items())
