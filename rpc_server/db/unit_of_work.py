"""The unit of work: one connection, one transaction, rolled back unless committed.

Each JSON-RPC call (each item of a batch, too) gets its own unit of work from the
factory in its context, so concurrent items never share a transaction (on SQLite,
units of work that only read share a connection: they have no transaction to share,
``rpc_server.db.sqlite``). A unit of work is a connection checked out of the driver's
pool at its first statement (``rpc_server.db.connection.UnitOfWorkConnection``), not
an ORM session: repositories turn rows straight into domain records, and an ORM session
would only add bookkeeping (identity map, snapshots, flush) that nothing here uses.

Read units of work (``write=False``) do not open a transaction (no BEGIN is sent), so a
read costs its statements and nothing else. Each statement still reads one consistent
snapshot; a read unit of work that needs several statements to agree with each other
must ask for ``write=True``.
Write units of work run in one transaction (``BEGIN IMMEDIATE`` on SQLite).

The calls of one batch request get their units of work from a ``BatchUnitOfWorkFactory``:
the same, except that their reads of a purchase by id are read several at once: the ids
the batch's calls said they would read (``expect_purchase``) in one statement, others
made at the same moment by the batch's concurrent calls in one statement
(``rpc_server.db.coalescing``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, Self, TypeVar, overload

from rpc_server.db.coalescing import PurchaseLookups
from rpc_server.db.connection import Engine, PoolObserver, UnitOfWorkConnection
from rpc_server.db.repositories import (
    SqlCourseRepository,
    SqlPurchaseEventRepository,
    SqlPurchaseRepository,
    SqlReceiptOutboxRepository,
    SqlRegistrationRepository,
    SqlUserRepository,
)
from rpc_server.db.repositories.events import Transition
from rpc_server.domain.records import Purchase

R = TypeVar("R")


class _Repository(Generic[R]):
    """A unit of work's repository, made on first use and then kept as an instance
    attribute (a call uses one or two of the six): ``functools.cached_property`` without
    the lock Python 3.11 takes on every first use."""

    def __init__(self, make: Callable[[SqlUnitOfWork], R]):
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, uow: None, owner: type | None = None) -> Self: ...

    @overload
    def __get__(self, uow: SqlUnitOfWork, owner: type | None = None) -> R: ...

    def __get__(self, uow: SqlUnitOfWork | None, owner: type | None = None) -> R | Self:
        if uow is None:
            return self
        # Not a data descriptor: from now on the instance's attribute is found first.
        repository = uow.__dict__[self.name] = self.make(uow)
        return repository


class SqlUnitOfWork:
    def __init__(
        self,
        connection: UnitOfWorkConnection,
        after_receipts: Sequence[Callable[[], None]] = (),
        lookups: PurchaseLookups | None = None,
        after_events: Sequence[Callable[[], None]] = (),
        after_transitions: Sequence[Callable[[Sequence[Transition]], None]] = (),
    ):
        self.connection = connection
        self._after_receipts = after_receipts
        self._after_events = after_events
        self._after_transitions = after_transitions
        # Where this unit of work's purchases by id are read (a batch's coalesced reads).
        self.lookups = lookups

    users = _Repository(lambda uow: SqlUserRepository(uow.connection))
    courses = _Repository(lambda uow: SqlCourseRepository(uow.connection))
    purchases = _Repository(lambda uow: SqlPurchaseRepository(uow.connection, uow.lookups))
    registrations = _Repository(lambda uow: SqlRegistrationRepository(uow.connection))
    receipts = _Repository(lambda uow: SqlReceiptOutboxRepository(uow.connection))
    events = _Repository(lambda uow: SqlPurchaseEventRepository(uow.connection))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Closing rolls back whatever was not committed and returns the connection.
        await self.connection.close()

    async def commit(self) -> None:
        await self.connection.commit()
        # Only repositories this unit of work used can have added anything.
        used = self.__dict__
        if "receipts" in used and self.receipts.added:
            # Receipts are committed: tell the deliverer, so they leave now, not at
            # its next poll.
            for listener in self._after_receipts:
                listener()
        if "events" in used and self.events.appended:
            # Purchase events are committed: the live feed reads them now (on
            # PostgreSQL other processes learn of them by NOTIFY: rpc_server.live).
            for listener in self._after_events:
                listener()
            for counter in self._after_transitions:
                counter(self.events.transitions)


class SqlUnitOfWorkFactory:
    """Makes units of work: reads without a transaction, writes in one (taking SQLite's
    write lock up front)."""

    def __init__(self, engine: Engine, pool_observer: PoolObserver | None = None):
        self.engine = engine
        self.pool_observer = pool_observer
        # Called after a commit that added receipt outbox rows (the deliverer's wake-up).
        self.after_receipts: list[Callable[[], None]] = []
        # Called after a commit that appended purchase events (the live feed's wake-up).
        self.after_events: list[Callable[[], None]] = []
        # Called with the state changes a commit made (the metrics' transition counts).
        self.after_transitions: list[Callable[[Sequence[Transition]], None]] = []

    def __call__(
        self, *, write: bool = False, lookups: PurchaseLookups | None = None
    ) -> SqlUnitOfWork:
        """A unit of work; a read one (only) looks purchases up through ``lookups``: a
        write one must read inside its own transaction."""
        connection = UnitOfWorkConnection(self.engine, write=write, observer=self.pool_observer)
        return SqlUnitOfWork(
            connection,
            self.after_receipts,
            None if write else lookups,
            self.after_events,
            self.after_transitions,
        )

    def expect_purchase(self, purchase_id: str) -> None:
        """A hint that a call will read this purchase: nothing to do outside a batch."""

    def for_batch(self) -> BatchUnitOfWorkFactory:
        """The factory for one batch request's calls (see ``BatchUnitOfWorkFactory``)."""
        return BatchUnitOfWorkFactory(self)

    async def read_purchases(
        self, purchase_ids: Sequence[str], owner_id: int | None
    ) -> dict[str, Purchase]:
        async with self() as uow:
            return await uow.purchases.get_many(purchase_ids, owner_id=owner_id)


class BatchUnitOfWorkFactory:
    """Units of work for the calls of one batch request: like the engine's, except that
    their reads of a purchase by id are read several at once: the purchases the batch's
    calls will read (``expect_purchase``) together, others made at the same moment
    together (``rpc_server.db.coalescing``). Write units of work are unchanged; the first
    one made ends the reading ahead, so that no read started after a write began answers
    from a read made before it."""

    def __init__(self, factory: SqlUnitOfWorkFactory):
        self._factory = factory
        self._lookups = PurchaseLookups(factory.read_purchases)

    def expect_purchase(self, purchase_id: str) -> None:
        """A call of the batch will read this purchase (the envelope says so before the
        batch runs): it is read ahead with the others expected."""
        self._lookups.expect(purchase_id)

    def __call__(self, *, write: bool = False) -> SqlUnitOfWork:
        if write:
            self._lookups.stop_reading_ahead()
        return self._factory(write=write, lookups=self._lookups)
