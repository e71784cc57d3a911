"""Where the frontend sends the buyer after a fulfillment request (``redirect_url``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from rpc_server.domain.records import Purchase
from rpc_server.domain.states import PurchaseState


@dataclass(frozen=True, slots=True)
class FrontendLinks:
    base_url: str

    def after_fulfillment(self, purchase: Purchase) -> str:
        """Return the page for a purchase's outcome.

        fulfilled: the course's start page; failed: back to checkout for this purchase;
        canceled (and, defensively, pending): the course's page.
        """
        base = self.base_url.rstrip("/")
        course = quote(purchase.course_slug, safe="")
        if purchase.state is PurchaseState.FULFILLED:
            return f"{base}/courses/{course}/start"
        if purchase.state is PurchaseState.FAILED:
            return f"{base}/checkout/{quote(purchase.purchase_id, safe='')}"
        return f"{base}/courses/{course}"
