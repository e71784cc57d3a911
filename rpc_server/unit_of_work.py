"""The SQLAlchemy unit of work: one session, one transaction, rolled back unless committed.

Each JSON-RPC call (each item of a batch, too) gets its own unit of work from the
factory in its context, so concurrent items never share a session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rpc_server.database import SQLITE_IMMEDIATE, SQLITE_READ_ONLY
from rpc_server.repositories import (
    SqlCourseRepository,
    SqlPurchaseRepository,
    SqlReceiptOutboxRepository,
    SqlRegistrationRepository,
    SqlUserRepository,
)


class SqlAlchemyUnitOfWork:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        after_receipts: Sequence[Callable[[], None]] = (),
    ):
        self._sessions = sessions
        self._after_receipts = after_receipts

    async def __aenter__(self) -> Self:
        self.session = self._sessions()
        self.users = SqlUserRepository(self.session)
        self.courses = SqlCourseRepository(self.session)
        self.purchases = SqlPurchaseRepository(self.session)
        self.registrations = SqlRegistrationRepository(self.session)
        self.receipts = SqlReceiptOutboxRepository(self.session)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.session.rollback()
        finally:
            await self.session.close()

    async def commit(self) -> None:
        await self.session.commit()
        if self.receipts.added:
            # Receipts are committed: tell the deliverer, so they leave now, not at
            # its next poll.
            for listener in self._after_receipts:
                listener()


class SqlAlchemyUnitOfWorkFactory:
    """Makes units of work; write units of work take SQLite's write lock up front."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        reader_engine = (
            engine.execution_options(**{SQLITE_READ_ONLY: True})
            if engine.dialect.name == "sqlite"
            else engine
        )
        self._readers = async_sessionmaker(reader_engine, expire_on_commit=False)
        writer_engine = (
            engine.execution_options(**{SQLITE_IMMEDIATE: True})
            if engine.dialect.name == "sqlite"
            else engine
        )
        self._writers = async_sessionmaker(writer_engine, expire_on_commit=False)
        # Called after a commit that added receipt outbox rows (the deliverer's wake-up).
        self.after_receipts: list[Callable[[], None]] = []

    def __call__(self, *, write: bool = False) -> SqlAlchemyUnitOfWork:
        return SqlAlchemyUnitOfWork(self._writers if write else self._readers, self.after_receipts)
