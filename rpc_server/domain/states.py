"""The fulfillment state machine, as a table.

| current \\ requested | fulfilled | failed | canceled |
|---|---|---|---|
| pending   | APPLY (registration + receipt) | APPLY (record error_msg) | APPLY |
| failed    | APPLY (payment retried)        | REPEAT                   | APPLY |
| fulfilled | REPEAT (no new side effects)   | CONFLICT                 | CONFLICT |
| canceled  | CONFLICT                       | CONFLICT                 | REPEAT |

REPEAT means: answer exactly as before and change nothing, which is what makes
``purchase.fulfill`` idempotent.

Who may ask for which outcome, checked only when the table above says APPLY (a REPEAT
needs no evidence), by the scope of the caller's token:

| scope \\ requested | canceled | failed | fulfilled |
|---|---|---|---|
| buyer (own purchases)    | ANYONE | ANYONE | PROOF (a verified payment event)        |
| payments (any purchase)  | ANYONE | ANYONE | ANYONE (it speaks for the provider)     |
| staff (any purchase)     | ANYONE | ANYONE | PROOF, or without one a recorded COMP   |

The payment webhook is not a token: a verified ``payment.succeeded`` event fulfils and a
``payment.failed`` event fails, whoever owns the purchase.
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


class Scope(StrEnum):
    """What a token may do (one per token, like a restricted API key)."""

    BUYER = "buyer"
    STAFF = "staff"
    PAYMENTS = "payments"


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


class Evidence(StrEnum):
    """What must back a requested outcome before it is applied."""

    ANYONE = "anyone"  # the caller's word is enough
    PROOF = "proof"  # a verified payment event for this purchase
    PROOF_OR_COMP = "proof_or_comp"  # a proof, or else recorded as a staff comp


_ANY, _PROOF, _COMP = Evidence.ANYONE, Evidence.PROOF, Evidence.PROOF_OR_COMP
_BUY, _STA, _PAY = Scope.BUYER, Scope.STAFF, Scope.PAYMENTS

OUTCOME_EVIDENCE: dict[tuple[Scope, PurchaseState], Evidence] = {
    (_BUY, _CAN): _ANY, (_BUY, _FAI): _ANY, (_BUY, _FUL): _PROOF,
    (_PAY, _CAN): _ANY, (_PAY, _FAI): _ANY, (_PAY, _FUL): _ANY,
    (_STA, _CAN): _ANY, (_STA, _FAI): _ANY, (_STA, _FUL): _COMP,
}  # fmt: skip

# Scopes that act on every user's purchases; a buyer acts only on their own.
SEES_EVERY_PURCHASE: frozenset[Scope] = frozenset({Scope.STAFF, Scope.PAYMENTS})


def evidence_for(scope: Scope, requested: PurchaseState) -> Evidence:
    """Return what a caller of ``scope`` needs to have ``requested`` applied.

    Raises ValueError for a requested state that cannot be asked for (``pending``).
    """
    try:
        return OUTCOME_EVIDENCE[(scope, requested)]
    except KeyError:
        raise ValueError(f"{requested!s} cannot be requested") from None
