"""SQLAlchemy 2 declarative models: the tables behind the purchase service.

The models are persistence only. The domain layer never sees them: repositories in
``rpc_server.db.repositories`` turn rows into the domain's frozen records. Guarantees that
must hold under concurrency live here, in the database: one registration per purchase,
one receipt per purchase, one purchase per (owner, idempotency key).
"""

from models.base import Base
from models.tables import (
    ApiToken,
    Course,
    CourseRegistration,
    EventSequence,
    Purchase,
    PurchaseEvent,
    RateLimitBucket,
    ReceiptOutbox,
    User,
)

__all__ = [
    "ApiToken",
    "Base",
    "Course",
    "CourseRegistration",
    "EventSequence",
    "Purchase",
    "PurchaseEvent",
    "RateLimitBucket",
    "ReceiptOutbox",
    "User",
]
