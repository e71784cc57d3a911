"""purchase.create, purchase.get, purchase.list, purchase.fulfill, purchase.events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rpc_server.domain import services
from rpc_server.domain.records import (
    Actor,
    Fulfillment,
    Purchase,
    PurchaseEventRecord,
    PurchasePage,
    SignedPayment,
)
from rpc_server.domain.states import PurchaseState
from rpc_server.jsonrpc.context import RpcContext


async def create_purchase(
    ctx: RpcContext, actor: Actor, *, course: str, idempotency_key: str | None = None
) -> Purchase:
    """Create a pending purchase of a course; retry-safe with an idempotency_key.

    One user may hold a limited number of pending purchases at once: past it the call
    answers 409 with data {pending, limit} and creates nothing (a replay still answers).
    """
    return await services.create_purchase(
        ctx.uow,
        actor,
        course=course,
        idempotency_key=idempotency_key,
        max_pending=ctx.max_pending_purchases,
    )


async def get_purchase(ctx: RpcContext, actor: Actor, *, purchase_id: str) -> Purchase:
    """Return one purchase: the caller's own, or any for staff."""
    return await services.get_purchase(ctx.uow, actor, purchase_id=purchase_id)


def read_purchase_ahead(ctx: RpcContext, params: Mapping[str, Any]) -> None:
    """purchase.get in a batch: the purchase is read with the batch's others."""
    ctx.uow.expect_purchase(params["purchase_id"])


async def list_purchases(
    ctx: RpcContext,
    actor: Actor,
    *,
    state: PurchaseState | None = None,
    limit: int = 20,
    cursor: int | None = None,
) -> PurchasePage:
    """List purchases newest first, a page at a time (pass next_cursor back as cursor)."""
    return await services.list_purchases(ctx.uow, actor, state=state, limit=limit, cursor=cursor)


async def fulfill_purchase(
    ctx: RpcContext,
    actor: Actor,
    *,
    purchase_id: str,
    purchase_state: PurchaseState,
    error_msg: str | None = None,
    payment_proof: SignedPayment | None = None,
) -> Fulfillment:
    """Record a payment outcome: fulfilled, failed or canceled; idempotent.

    Fulfilling needs evidence of payment: a buyer passes the signed payment event as
    payment_proof; a payments-scope token needs none; staff without one record a comp.
    """
    return await services.fulfill_purchase(
        ctx.uow,
        actor,
        ctx.links,
        purchase_id=purchase_id,
        purchase_state=purchase_state,
        error_msg=error_msg,
        payment_proof=payment_proof,
        verifier=ctx.payments,
    )


async def list_purchase_events(
    ctx: RpcContext, actor: Actor, *, purchase_id: str
) -> list[PurchaseEventRecord]:
    """Return the history of a purchase, oldest first.

    Every state change, who made it and on what evidence. The buyer sees their own
    purchases' history; staff and payments see any purchase's.
    """
    return await services.list_purchase_events(ctx.uow, actor, purchase_id=purchase_id)
