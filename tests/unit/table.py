"""The fulfillment table as the issue states it, written out independently of the code."""

from rpc_server.domain.states import PurchaseState, Step

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
