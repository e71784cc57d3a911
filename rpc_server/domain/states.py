"""The fulfillment state machine, as a table.

| current \\ requested | fulfilled | failed | canceled |
|---|---|---|---|
| pending   | APPLY (registration + receipt) | APPLY (record error_msg) | APPLY |
| failed    | APPLY (payment retried)        | REPEAT                   | APPLY |
| fulfilled | REPEAT (no new side effects)   | CONFLICT                 | CONFLICT |
| canceled  | CONFLICT                       | CONFLICT                 | REPEAT |

REPEAT means: answer exactly as before and change nothing, which is what makes
``purchase.fulfill`` idempotent.
"""

from __future__ import annotations

from enum import StrEnum


class PurchaseState(StrEnum):
    PENDING = "pending"
    FULFILLED = "fulfilled"
    FAILED = "failed"
    CANCELED = "canceled"


# The states a client may ask for; ``pending`` is only ever the starting state.
REQUESTABLE_STATES: tuple[PurchaseState, ...] = (
    PurchaseState.FULFILLED,
    PurchaseState.FAILED,
    PurchaseState.CANCELED,
)


class Step(StrEnum):
    APPLY = "apply"
    REPEAT = "repeat"
    CONFLICT = "conflict"


_A, _R, _C = Step.APPLY, Step.REPEAT, Step.CONFLICT
_P, _FUL, _FAI, _CAN = (
    PurchaseState.PENDING,
    PurchaseState.FULFILLED,
    PurchaseState.FAILED,
    PurchaseState.CANCELED,
)

TRANSITIONS: dict[tuple[PurchaseState, PurchaseState], Step] = {
    (_P, _FUL): _A, (_P, _FAI): _A, (_P, _CAN): _A,
    (_FAI, _FUL): _A, (_FAI, _FAI): _R, (_FAI, _CAN): _A,
    (_FUL, _FUL): _R, (_FUL, _FAI): _C, (_FUL, _CAN): _C,
    (_CAN, _FUL): _C, (_CAN, _FAI): _C, (_CAN, _CAN): _R,
}  # fmt: skip


def step_for(current: PurchaseState, requested: PurchaseState) -> Step:
    """Return what requesting ``requested`` on a purchase in ``current`` does.

    Raises ValueError for a requested state that cannot be asked for (``pending``).
    """
    try:
        return TRANSITIONS[(current, requested)]
    except KeyError:
        raise ValueError(f"{requested!s} cannot be requested") from None


def sources_of(requested: PurchaseState) -> frozenset[PurchaseState]:
    """Return the states from which ``requested`` is applied (not repeated)."""
    return frozenset(
        current
        for (current, target), step in TRANSITIONS.items()
        if target == requested and step is Step.APPLY
    )
