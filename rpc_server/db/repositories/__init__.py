"""SQL repositories, one module per aggregate: rows in, frozen domain records out.

They run SQLAlchemy Core statements, built once at import with bound parameters, on the
unit of work's connection (``rpc_server.db.connection``): no ORM session, no identity
map, no objects loaded only to be copied into records. They never commit.
"""

from rpc_server.db.repositories.courses import SqlCourseRepository
from rpc_server.db.repositories.events import SqlPurchaseEventRepository
from rpc_server.db.repositories.outbox import SqlReceiptOutboxRepository
from rpc_server.db.repositories.purchases import SqlPurchaseRepository
from rpc_server.db.repositories.registrations import (
    SqlRegistrationRepository,
    registration_page_query,
)
from rpc_server.db.repositories.users import SqlUserRepository

__all__ = [
    "SqlCourseRepository",
    "SqlPurchaseEventRepository",
    "SqlPurchaseRepository",
    "SqlReceiptOutboxRepository",
    "SqlRegistrationRepository",
    "SqlUserRepository",
    "registration_page_query",
]
