"""``POST /webhooks/payments``: signed payment events from the shop's payment backend.

Plain HTTP, as payment providers post it (not JSON-RPC): the Standard Webhooks headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``, the payload as the raw
body. The raw bytes are verified before anything parses them
(``rpc_server.payment_signatures``); then ``services.record_payment_event`` applies the
event through the same state machine and checks as ``purchase.fulfill`` with a proof.

Answers (JSON): 200 once handled, including a replay, an event the purchase no longer
takes, and an event refused as a mismatch or a reused payment (retrying cannot help, so
the provider should stop); 400 malformed; 401 bad signature or timestamp; 413 a body
over ``MAX_BODY_BYTES``; 503 the database is unavailable (the provider retries).
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from rpc_server.domain.errors import PaymentNotVerified
from rpc_server.domain.records import SignedPayment

log = logging.getLogger("rpc_server.http.webhooks")

MAX_BODY_BYTES = 256 * 1024
HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# The HTTP status of each refusal; those not listed were handled (200).
REFUSAL_STATUS = {"malformed": 400, "invalid_signature": 401, "expired": 401}


def signed_payment(request: web.Request, body: bytes) -> SignedPayment:
    """The delivery's headers and body; raise PaymentNotVerified("malformed") if a header
    is missing, repeated or not of its form."""
    values = {}
    for name in HEADERS:
        found = request.headers.getall(name, [])
        if len(found) != 1:
            raise PaymentNotVerified("malformed", f"send the {name} header exactly once")
        values[name] = found[0].strip()
    if not _TIMESTAMP.fullmatch(values["webhook-timestamp"]):
        raise PaymentNotVerified("malformed", "webhook-timestamp must be integer Unix seconds")
    return SignedPayment(
        message_id=values["webhook-id"],
        timestamp=int(values["webhook-timestamp"]),
        signature=values["webhook-signature"],
        payload=body,
    )


def refusal(exc: PaymentNotVerified) -> tuple[dict[str, str], int]:
    """The answer to a refused event, and its HTTP status."""
    status = REFUSAL_STATUS.get(exc.reason, 200)
    outcome = "refused" if status == 200 else "error"
    log.warning("payment event %s: %s (%s)", outcome, exc.reason, exc.detail)
    return {"status": outcome, "reason": exc.reason, "message": exc.detail}, status
