"""The event feed: this process's one reader of purchase events, and its subscriptions.

Where it sits: woken after a commit that appended events (in-process, and on PostgreSQL
by the ``listener`` for every process's commits), it reads the events after the last
one it has seen, by sequence number, and hands each to the subscriptions it concerns.

Why reading by sequence is enough: sequence numbers follow commit order with no gap
(``models.EventSequence``), so once event N is visible every event before it is too.
Whatever wakes the feed (a notification, a commit here, the reconnection of the
listener, the poll) it reads ``seq > last_seq``: a lost wake-up delays events, never
loses them.

A subscription starts held: added to the feed (so no live event can slip past it), its
live events are kept aside until ``begin`` runs, after the answer naming the
subscription has been queued. ``begin`` replays the events after ``since`` up to where
the feed stood when the subscription was added, then the held ones, then lets it go
live. Each subscription's ``cursor`` (the last sequence number handed to it) drops any
event it has had already: every event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from rpc_server.domain import services
from rpc_server.domain.errors import Unavailable
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import Actor, PurchaseUpdate, UpdateScope

log = logging.getLogger("rpc_server.live")

# Events read per statement, when catching up or replaying.
PAGE_SIZE = 500
# How long stopping waits for the statement under way.
STOP_SECONDS = 5.0


class Subscriber(Protocol):
    """Where a subscription's messages go (a WebSocket connection): never awaits."""

    def send_update(self, subscription: Subscription, update: Delivery) -> None: ...

    def send_resync(self, subscription: Subscription, seq: int, reason: str) -> None: ...

    def fell_behind(self, subscription: Subscription) -> None:
        """More live events were held for ``subscription`` than it may hold."""


class Delivery:
    """One update on its way to every subscription it concerns; ``rendered`` caches its
    notification's result, serialized once per way of seeing it (``messages``)."""

    __slots__ = ("rendered", "update")

    def __init__(self, update: PurchaseUpdate):
        self.update = update
        self.rendered: dict[Any, Any] = {}

    @property
    def seq(self) -> int:
        return self.update.seq


def new_subscription_id() -> str:
    """An opaque, unguessable id (128 random bits as 32 hex characters)."""
    return secrets.token_hex(16)


@dataclass(eq=False)
class Subscription:
    """One ``purchase.subscribe``: who asked, what it covers, and what it has been sent."""

    subscriber: Subscriber
    actor: Actor
    scope: UpdateScope
    # The last sequence number handed to it: nothing at or before it is sent.
    cursor: int
    # Replay the events after ``since`` (None: live only).
    since: int | None = None
    subscription_id: str = field(default_factory=new_subscription_id)
    # Where the feed stood when the subscription was added: the replay's upper bound.
    added_at: int = 0
    live: bool = False
    held: list[Delivery] = field(default_factory=list)
    ended: bool = False

    def hand(self, delivery: Delivery) -> None:
        """Send ``delivery`` unless it has been sent already."""
        if delivery.seq > self.cursor and not self.ended:
            self.cursor = delivery.seq
            self.subscriber.send_update(self, delivery)


class EventFeed:
    """Reads purchase events as they are committed and fans them out to subscriptions."""

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        *,
        replay_window: int,
        poll_interval: float,
        max_held: int = 10_000,
        count_changed: Callable[[int], None] | None = None,
    ):
        """``count_changed``: told the number of subscriptions whenever it changes."""
        self._uow = uow_factory
        self.replay_window = replay_window
        self.poll_interval = poll_interval
        self.max_held = max_held
        # The last event handed out (None until ``start``).
        self.last_seq: int | None = None
        self._everything: set[Subscription] = set()
        self._by_owner: dict[int, set[Subscription]] = {}
        self._by_purchase: dict[int, set[Subscription]] = {}
        self._count = 0
        self._count_changed = count_changed
        self._wakeup = asyncio.Event()
        self._started = asyncio.Event()  # set once last_seq is known
        self._stopping = False
        self._reader: asyncio.Task[None] | None = None
        self._replays: set[asyncio.Task[None]] = set()
        # How many events this feed has read, and handed to subscriptions (for tests).
        self.events_read = 0

    @property
    def subscription_count(self) -> int:
        return self._count

    async def start(self) -> None:
        """Start reading (in a task: a database that is down at startup must not stop the
        server; until the feed knows where the events stand, subscribing answers -32000).
        Where the events stand is read here first, so that a server that starts with its
        database up has done that read before it serves."""
        try:
            async with asyncio.timeout(STOP_SECONDS):
                self.last_seq = await services.latest_event_seq(self._uow)
            self._started.set()
        except Exception as exc:
            log.warning("live feed cannot start yet: %s; retrying", type(exc).__name__)
        self._reader = asyncio.create_task(self._read_forever(), name="live-event-feed")

    async def stop(self) -> None:
        """Stop reading: the statement under way finishes first (a driver call cut
        short would leave SQLite's worker thread answering a loop that has gone)."""
        self._stopping = True
        self._wakeup.set()
        if self._reader is not None:
            done, _ = await asyncio.wait([self._reader], timeout=STOP_SECONDS)
            if not done:
                self._reader.cancel()
        tasks = [*self._replays, *([self._reader] if self._reader else [])]
        for task in self._replays:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reader = None

    async def ready(self, within: float) -> None:
        """Return once the feed knows where the events stand (at once, but for the first
        moments after startup; raises Unavailable if that takes over ``within`` s), its
        bookmark current if nobody was subscribed."""
        if self.last_seq is None:
            try:
                async with asyncio.timeout(within):
                    await self._started.wait()
            except TimeoutError:
                raise Unavailable() from None
        if not self._count:
            # Idle, the feed reads nothing (see ``_read_new``): move its bookmark to the
            # latest event, unless a subscription arrived meanwhile (then the reader
            # goes on from where it stands, so that nothing is skipped for it).
            latest = await services.latest_event_seq(self._uow)
            if not self._count and self.last_seq is not None:
                self.last_seq = max(self.last_seq, latest)

    def wake(self, seq: int | None = None) -> None:
        """Events up to ``seq`` (None: unknown) may have been committed: read them."""
        if seq is not None and self.last_seq is not None and seq <= self.last_seq:
            return  # read already (a local commit woke the feed first)
        if not self._count:
            # Nobody listens, so the reader would read nothing (``_read_new``): not woken
            # after every commit; the first subscription wakes it (``add``).
            return
        self._wakeup.set()

    # --- subscriptions --------------------------------------------------------------

    def add(self, subscription: Subscription) -> None:
        """Register ``subscription``, held: from now on every event it concerns reaches
        it (kept aside until ``begin``). Never awaits, so a caller's check of a limit
        and this registration are one step."""
        if self.last_seq is None:
            raise Unavailable()
        subscription.added_at = self.last_seq
        subscription.cursor = self.last_seq if subscription.since is None else subscription.since
        self._index(subscription).add(subscription)
        self._count += 1
        if self._count == 1:
            self._wakeup.set()  # what was committed while nobody listened: read it now
        if self._count_changed is not None:
            self._count_changed(self._count)

    def remove(self, subscription: Subscription) -> None:
        if subscription.ended:
            return
        subscription.ended = True
        subscription.held.clear()
        index = self._index(subscription)
        index.discard(subscription)
        self._count -= 1
        if self._count_changed is not None:
            self._count_changed(self._count)
        scope = subscription.scope
        if not index:
            if scope.purchase_pk is not None:
                self._by_purchase.pop(scope.purchase_pk, None)
            elif scope.owner_id is not None:
                self._by_owner.pop(scope.owner_id, None)

    def begin(self, subscription: Subscription) -> None:
        """Replay what ``subscription`` asked for, then let it go live (in a task: the
        caller has just queued the answer that names it)."""
        task = asyncio.create_task(self._begin(subscription), name="live-replay")
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    def _index(self, subscription: Subscription) -> set[Subscription]:
        scope = subscription.scope
        if scope.purchase_pk is not None:
            return self._by_purchase.setdefault(scope.purchase_pk, set())
        if scope.owner_id is not None:
            return self._by_owner.setdefault(scope.owner_id, set())
        return self._everything

    def _concerned(self, delivery: Delivery) -> Iterator[Subscription]:
        purchase = delivery.update.purchase
        yield from self._everything
        yield from self._by_owner.get(purchase.owner_id, ())
        yield from self._by_purchase.get(purchase.pk, ())

    async def _begin(self, subscription: Subscription) -> None:
        try:
            since, upto = subscription.since, subscription.added_at
            if since is not None and since < upto:
                if upto - since > self.replay_window:
                    subscription.cursor = upto
                    subscription.subscriber.send_resync(
                        subscription,
                        upto,
                        f"since is more than {self.replay_window} events before the latest: "
                        "read the purchases again (purchase.list, purchase.get); updates "
                        f"follow from seq {upto}",
                    )
                else:
                    await self._replay(subscription, since, upto)
            held, subscription.held = subscription.held, []
            for delivery in held:
                subscription.hand(delivery)
            subscription.live = not subscription.ended
        except Exception:
            # The database failed mid-replay: the subscriber cannot be given a gapless
            # stream, so it is told to start again (its connection closes).
            log.warning("replay for a subscription failed", exc_info=True)
            if not subscription.ended:
                subscription.subscriber.fell_behind(subscription)

    async def _replay(self, subscription: Subscription, since: int, upto: int) -> None:
        after = since
        while after < upto and not subscription.ended:
            page = await services.purchase_updates(
                self._uow, after, subscription.scope, upto=upto, limit=PAGE_SIZE
            )
            for update in page:
                subscription.hand(Delivery(update))
            if len(page) < PAGE_SIZE:
                return
            after = page[-1].seq

    # --- reading --------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while self.last_seq is None and not self._stopping:
            try:
                self.last_seq = await services.latest_event_seq(self._uow)
                self._started.set()
            except Exception as exc:
                log.warning("live feed cannot start: %s; retrying", type(exc).__name__)
                await asyncio.sleep(min(self.poll_interval, 1.0))
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                await self._read_new()
            except Exception as exc:
                # The database is unavailable: nothing is lost, the next wake-up or poll
                # reads from the same place.
                log.warning("live feed cannot read events: %s", type(exc).__name__)
                await asyncio.sleep(min(self.poll_interval, 1.0))
                self._wakeup.set()  # and try again

    async def _read_new(self) -> None:
        assert self.last_seq is not None
        while True:
            if not self._count:
                # Nobody listens: read nothing (an idle process costs the database no
                # statement); ``ready`` moves the bookmark on before the next subscription.
                return
            page = await services.purchase_updates(
                self._uow, self.last_seq, UpdateScope(), limit=PAGE_SIZE
            )
            for update in page:
                self._dispatch(Delivery(update))
            if len(page) < PAGE_SIZE:
                return

    def _dispatch(self, delivery: Delivery) -> None:
        self.events_read += 1
        for subscription in list(self._concerned(delivery)):
            if subscription.live:
                subscription.hand(delivery)
            elif delivery.seq > subscription.cursor:
                subscription.held.append(delivery)
                if len(subscription.held) > self.max_held:
                    subscription.subscriber.fell_behind(subscription)
        self.last_seq = delivery.seq
