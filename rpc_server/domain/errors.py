"""Domain errors. The method layer maps them to JSON-RPC codes in one table.

Each error carries a message meant for the person calling and, optionally, structured
``data``. Neither ever holds internals.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    message: str = "Domain error"

    def __init__(self, message: str | None = None, data: dict[str, Any] | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.data = data


class Unauthenticated(DomainError):
    message = "Unauthenticated: send a valid token as 'Authorization: Bearer <token>'"


class Unavailable(DomainError):
    """Something the call needs is not ready yet (the database is down): retry later."""

    message = "Service unavailable: try again later"


class InvalidArgument(DomainError):
    """Params that are well-formed but cannot be acted on (checked against the data)."""

    message = "Invalid params"


class WebSocketOnly(DomainError):
    """A method that needs a WebSocket connection was called over plain HTTP."""

    message = "Method not found"

    def __init__(self, method: str):
        super().__init__(
            data={
                "method": method,
                "reason": f"{method} is available over a WebSocket connection to /rpc only "
                "(GET /rpc with an Upgrade: websocket header)",
            }
        )


class NotFound(DomainError):
    message = "Not found"


class Conflict(DomainError):
    message = "Conflict"


class InvalidTransition(Conflict):
    def __init__(self, current: str, requested: str):
        super().__init__(
            f"A {current} purchase cannot become {requested}",
            {"current_state": current, "requested_state": requested},
        )


class IdempotencyKeyReused(Conflict):
    def __init__(self, idempotency_key: str, course: str):
        super().__init__(
            "This idempotency_key was already used for a purchase of another course",
            {"idempotency_key": idempotency_key, "course": course},
        )


class AlreadyRegistered(Conflict):
    def __init__(self, course: str):
        super().__init__("You are already registered for this course", {"course": course})


class TooManyPendingPurchases(Conflict):
    """The caller already holds as many open (pending) purchases as one user may."""

    def __init__(self, pending: int, limit: int):
        super().__init__(
            f"You have {pending} open purchases, the most allowed: pay for or cancel one "
            "before starting another",
            {"pending": pending, "limit": limit},
        )


class PaymentNotVerified(DomainError):
    """A fulfilment (or a payment event) without evidence the server can check.

    ``reason`` is one of ``REASONS``; nothing was written.
    """

    REASONS = ("missing", "invalid_signature", "expired", "mismatch", "reused", "malformed")
    message = "Payment not verified"

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        super().__init__(f"Payment not verified: {detail}", {"reason": reason})
        self.reason = reason
        self.detail = detail
