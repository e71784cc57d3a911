"""Paying for purchases in the integration and reliability tests.

A buyer fulfils a purchase only with a signed payment event (``payment_proof``): these
helpers sign one for a ``Purchase`` record or a serialized purchase with the key the
test settings configure (``tests.payments.TEST_PAYMENT_KEY``, signed by the
``standardwebhooks`` reference library, not by the code under test), and verify with a
real ``PaymentSignatures`` holding that key, as the app does.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, Fulfillment, Purchase, SignedPayment
from rpc_server.domain.states import PurchaseState
from rpc_server.payment_signatures import PaymentSignatures
from tests.conftest import FRONTEND_URL
from tests.payments import TEST_PAYMENT_KEY, proof_for

# What the app builds from RPC_SERVER_PAYMENT_KEYS=TEST_PAYMENT_KEY.
VERIFIER = PaymentSignatures((TEST_PAYMENT_KEY,))
LINKS = FrontendLinks(FRONTEND_URL)


def serialized(purchase: Purchase) -> dict[str, Any]:
    """The fields of a purchase a payment event repeats, as ``purchase.get`` shows them."""
    return {
        "purchase_id": purchase.purchase_id,
        "amount": f"{purchase.amount.quantize(Decimal('0.01'))}",
        "currency": purchase.currency,
    }


def as_signed(proof: dict[str, Any]) -> SignedPayment:
    """A ``payment_proof`` object as ``purchase.fulfill`` loads it."""
    return SignedPayment(
        message_id=proof["id"],
        timestamp=proof["timestamp"],
        signature=proof["signature"],
        payload=proof["payload"].encode(),
    )


def payment_for(purchase: Purchase, **proof: Any) -> SignedPayment:
    """A fresh signed ``payment.succeeded`` event paying for ``purchase`` exactly
    (keyword arguments go to ``tests.payments.proof_for``)."""
    return as_signed(proof_for(serialized(purchase), **proof))


async def pay_and_fulfil(
    uow_factory: SqlUnitOfWorkFactory,
    actor: Actor,
    purchase: Purchase,
    *,
    payment: SignedPayment | None = None,
) -> Fulfillment:
    """Fulfil ``purchase`` as ``actor`` (its buyer) with a proof of payment, as the
    frontend does once the payment step succeeded."""
    return await services.fulfill_purchase(
        uow_factory,
        actor,
        LINKS,
        purchase_id=purchase.purchase_id,
        purchase_state=PurchaseState.FULFILLED,
        payment_proof=payment or payment_for(purchase),
        verifier=VERIFIER,
    )
