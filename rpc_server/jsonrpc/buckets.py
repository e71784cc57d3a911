"""Token buckets: the store behind the rate limits (``rpc_server.jsonrpc.rate_limit``).

A bucket holds up to ``burst`` calls and refills at ``rate`` calls per second; taking
``n`` grants ``min(n, floor(tokens))``. Buckets live in this process (``MemoryBuckets``,
on SQLite: one process) or in PostgreSQL (``DatabaseBuckets``, shared by every process
of the deployment: at most one UPSERT per HTTP request, however many items it holds), and then
in this process's memory for as long as PostgreSQL cannot be reached
(``FallbackBuckets``; why: ``rpc_server.jsonrpc.rate_limit``). A busy caller's next
calls are taken ahead with its current ones, a little at a time, so that most of its
requests need no statement (``LeasedBuckets``), and the takes of one bucket that requests
make at the same moment (the same turn of the event loop) go to PostgreSQL as one
(``CoalescedBuckets``).

Buckets are never kept longer than needed: a bucket left idle for ``burst / rate``
seconds is full again, the same as no bucket at all, so it may be forgotten. In memory
the least recently used are forgotten beyond ``max_keys``; in PostgreSQL a process
deletes the rows idle that long, at most once per ``purge_interval``, after a take.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text

from rpc_server.db.connection import Engine
from rpc_server.db.engines import autocommit

log = logging.getLogger("rpc_server.jsonrpc.rate_limit")


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` calls per second refilling a bucket of ``burst``."""

    rate: float
    burst: int

    @property
    def full_after(self) -> float:
        """Seconds after which an idle bucket is full again, whatever it held."""
        return self.burst / self.rate

    def retry_after(self, tokens_left: float, cost: int = 1) -> float:
        """Seconds until a bucket holding ``tokens_left`` holds ``cost``."""
        return round(max(0.0, (cost - tokens_left) / self.rate), 3)


@dataclass(frozen=True, slots=True)
class Grant:
    """How many of the calls asked for were granted, and what the bucket holds after."""

    granted: int
    tokens_left: float


class Buckets(Protocol):
    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        """Take up to ``calls`` from ``key``'s bucket, which follows ``limit``."""
        ...


class MemoryBuckets:
    """One process's buckets; the least recently used are forgotten beyond ``max_keys``."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_keys, self.clock = max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def holds(self, key: str, limit: Limit) -> float:
        """What ``key``'s bucket holds now (nothing is taken)."""
        now = self.clock()
        tokens, updated = self._buckets.get(key, (float(limit.burst), now))
        return min(float(limit.burst), tokens + (now - updated) * limit.rate)

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        now = self.clock()
        tokens, updated = self._buckets.pop(key, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - updated) * limit.rate)
        granted = min(calls, math.floor(tokens))
        tokens -= granted
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return Grant(granted, tokens)


# Every expression in SET sees the row as it was, so refill and grant are computed from
# one consistent snapshot; the row lock serializes concurrent requests of one bucket.
_TAKE = text(
    """
    WITH arg AS (
        SELECT CAST(:calls AS integer) AS calls, CAST(:burst AS double precision) AS burst,
               CAST(:rate AS double precision) AS rate
    )
    INSERT INTO rate_limit_buckets AS b (key, tokens, updated_at, last_granted)
    SELECT :key, arg.burst - LEAST(arg.calls, arg.burst), now(), LEAST(arg.calls, arg.burst)
    FROM arg
    ON CONFLICT (key) DO UPDATE SET
        last_granted = (SELECT LEAST(arg.calls, FLOOR(LEAST(arg.burst,
            b.tokens + EXTRACT(EPOCH FROM now() - b.updated_at) * arg.rate))) FROM arg),
        tokens = (SELECT LEAST(arg.burst,
                b.tokens + EXTRACT(EPOCH FROM now() - b.updated_at) * arg.rate)
            - LEAST(arg.calls, FLOOR(LEAST(arg.burst,
                b.tokens + EXTRACT(EPOCH FROM now() - b.updated_at) * arg.rate))) FROM arg),
        updated_at = now()
    RETURNING last_granted, tokens
    """
)

# A row idle for ``idle`` seconds, the longest any limit takes to refill, is a full
# bucket. A take racing the delete either updates the row first (then it is not idle
# when the delete rechecks it) or waits for the delete and inserts a full bucket.
_PURGE = text(
    "DELETE FROM rate_limit_buckets "
    "WHERE updated_at < now() - make_interval(secs => CAST(:idle AS double precision)) "
    "RETURNING 1"
)


class DatabaseBuckets:
    """Buckets in PostgreSQL, shared by every process of the deployment.

    ``idle_after``: seconds after which any bucket is full again (the longest
    ``Limit.full_after`` of the limits that use this store); rows idle that long are
    deleted, at most once per ``purge_interval`` seconds per process.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        idle_after: float,
        purge_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine, self.idle_after, self.purge_interval = engine, idle_after, purge_interval
        self.clock = clock
        self._next_purge = clock() + purge_interval

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        # One statement, its own transaction (autocommit: no BEGIN or COMMIT round
        # trips), apart from the calls' units of work: the row lock lasts that statement.
        async with autocommit(self.engine) as connection:
            rows = await connection.execute(
                _TAKE, {"key": key, "calls": calls, "burst": limit.burst, "rate": limit.rate}
            )
        last_granted, tokens = rows.all()[0]
        grant = Grant(int(last_granted), float(tokens))
        if self.clock() >= self._next_purge:
            await self.purge()
        return grant

    async def purge(self) -> int:
        """Delete the buckets idle for ``idle_after`` seconds; return how many."""
        self._next_purge = self.clock() + self.purge_interval
        try:
            async with autocommit(self.engine) as connection:
                deleted = await connection.execute(_PURGE, {"idle": self.idle_after})
        except Exception as exc:  # the take succeeded: its answer stands
            log.warning("purging idle rate-limit buckets failed: %s", type(exc).__name__)
            return 0
        return len(deleted)


class CoalescedBuckets:
    """``store``'s buckets, the takes of one bucket made at the same moment taken at once.

    Under load, requests of one caller (a frontend's user, a busy client address) arrive
    together: each would run its own UPSERT of the same row, one after another on its row
    lock. Here the takes made before the event loop comes round again are summed per
    bucket and taken with one statement, then the grant is shared out in the order they
    were made, each getting what it asked for while the grant lasts: what taking them one
    after another at that moment would have given. Each sees the bucket as the whole take
    left it (its ``tokens_left`` sets a refused call's ``retry_after``).
    """

    def __init__(self, store: Buckets):
        self.store = store
        self._waiting: dict[tuple[str, Limit], list[tuple[int, asyncio.Future[Grant]]]] = {}
        self._takes: set[asyncio.Task[None]] = set()  # running takes (kept referenced)

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._start_takes)
        future: asyncio.Future[Grant] = loop.create_future()
        self._waiting.setdefault((key, limit), []).append((calls, future))
        return await future

    def _start_takes(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for (key, limit), takes in waiting.items():
            task = asyncio.ensure_future(self._take(key, limit, takes))
            self._takes.add(task)
            task.add_done_callback(self._takes.discard)

    async def _take(
        self, key: str, limit: Limit, takes: list[tuple[int, asyncio.Future[Grant]]]
    ) -> None:
        try:
            grant = await self.store.take(key, sum(calls for calls, _ in takes), limit)
        except Exception as error:  # each request handles it (FallbackBuckets)
            for _, future in takes:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:  # cancelled (the server is stopping): so are the takes
            for _, future in takes:
                future.cancel()
            raise
        left = grant.granted
        for calls, future in takes:
            granted = min(calls, left)
            left -= granted
            if not future.done():
                future.set_result(Grant(granted, grant.tokens_left))


class LeasedBuckets:
    """``store``'s buckets, a busy caller's next calls taken ahead with the current ones.

    Every take of ``store`` is a statement on PostgreSQL: for a caller sending many
    requests through this process that is a statement per request (or per turn of the
    event loop, ``CoalescedBuckets``), which cost a cheap call a quarter of its
    throughput. So a take that goes to the store also takes, ahead, as many calls as
    this caller asked of this process in the last ``window`` seconds (0.1), at most
    ``share`` of its burst (a tenth) and never more than the store holds: the caller's
    next calls are granted from that lease here, without a statement, while it lasts
    and for ``hold`` seconds at most (then what is left of it is dropped). A caller
    whose requests are further apart than ``window`` never takes ahead: each of its
    takes is the store's, as without this layer.

    What it does not change: a call is granted only from tokens the shared bucket gave,
    and a call is refused only when the shared bucket cannot cover it together with
    what this process holds for the caller. What it changes, within a tenth of the
    burst: tokens a process took ahead are no longer in the shared bucket, so a caller
    spread over several processes may be refused while another process still holds up
    to a tenth of its burst for it (dropped after ``hold``); and a lease taken when the
    bucket was nearly full, used after it refilled, lets the caller have up to that
    tenth more than one burst in a moment. A limit whose tenth of a burst is below one
    call (a burst under 10) is never leased.
    """

    def __init__(
        self,
        store: Buckets,
        *,
        window: float = 0.1,
        hold: float = 1.0,
        share: float = 0.1,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.window, self.hold, self.share = store, window, hold, share
        self.max_keys, self.clock = max_keys, clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()

    def held(self, key: str) -> int:
        """The calls this process holds for ``key`` now (expired leases hold none)."""
        lease = self._leases.get(key)
        if lease is None or self.clock() >= lease.expires:
            return 0
        return lease.held

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        now = self.clock()
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease(now)
            while len(self._leases) > self.max_keys:
                self._leases.popitem(last=False)
        else:
            self._leases.move_to_end(key)
        asked_before = lease.asked(now, calls, self.window)
        if now >= lease.expires:
            lease.held = 0
        if lease.held >= calls:
            lease.held -= calls
            return Grant(calls, lease.store_left + lease.held)
        # Not enough here: this take goes to the store, with what is held counted in,
        # and (unless another take of this caller is asking ahead already) the calls
        # of the last window taken ahead.
        have, lease.held = lease.held, 0
        ahead = 0
        if not lease.refilling:
            ahead = min(asked_before, int(limit.burst * self.share))
            lease.refilling = ahead > 0
        try:
            grant = await self.store.take(key, calls - have + ahead, limit)
        except BaseException:
            lease.held += have  # still this caller's
            raise
        finally:
            if ahead:
                lease.refilling = False
        # All of it goes to the lease, and this take's calls come out of the lease: a take
        # answered by the same statement as one asking ahead may thus have what that one
        # took ahead before its own calls (``CoalescedBuckets`` gives out in order).
        lease.held += have + grant.granted
        granted = min(calls, lease.held)
        lease.held -= granted
        if lease.held:
            lease.expires = self.clock() + self.hold
        lease.store_left = grant.tokens_left
        return Grant(granted, grant.tokens_left + lease.held)


class _Lease:
    """What one process holds for one caller, and what the caller asked of it lately."""

    __slots__ = ("count", "expires", "held", "last", "refilling", "started", "store_left")

    def __init__(self, now: float) -> None:
        self.held = 0  # calls taken ahead from the store, not yet granted
        self.expires = now  # when what is held is dropped
        self.store_left = 0.0  # what the store said the bucket held after the last take
        self.refilling = False  # a take asking ahead is on its way to the store
        self.started, self.count, self.last = now, 0, 0  # this window's calls, the last's

    def asked(self, now: float, calls: int, window: float) -> int:
        """Count ``calls`` in this window; return the calls asked in the window before it
        and in this one before these."""
        elapsed = now - self.started
        if elapsed >= window:
            self.last = self.count if elapsed < 2 * window else 0
            self.started, self.count = now, 0
        asked = self.last + self.count
        self.count += calls
        return asked


class FallbackBuckets:
    """``store``'s buckets, or this process's own (``fallback``) while it cannot be reached.

    After a failure the store is left alone for ``retry_store_after`` seconds (so an
    outage costs one failed attempt per interval, not one per request), then tried
    again. The outage and the recovery are logged once each.
    """

    def __init__(
        self,
        store: Buckets,
        fallback: MemoryBuckets,
        *,
        retry_store_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.fallback = store, fallback
        self.retry_store_after, self.clock = retry_store_after, clock
        self._store_down = False
        self._retry_store_at = 0.0

    @property
    def store_down(self) -> bool:
        return self._store_down

    async def take(self, key: str, calls: int, limit: Limit) -> Grant:
        if self.clock() >= self._retry_store_at:
            try:
                grant = await self.store.take(key, calls, limit)
            except Exception as exc:
                self._retry_store_at = self.clock() + self.retry_store_after
                if not self._store_down:
                    self._store_down = True
                    log.warning(
                        "rate-limit store unavailable (%s): limiting in this process until "
                        "it answers again",
                        type(exc).__name__,
                    )
            else:
                if self._store_down:
                    self._store_down = False
                    log.info("rate-limit store available again")
                return grant
        return await self.fallback.take(key, calls, limit)
