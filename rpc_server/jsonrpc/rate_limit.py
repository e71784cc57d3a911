"""Rate limits: who pays for a request's calls, and what each call costs. Limits come
before trust: the envelope asks ``RateLimits.admit`` once per HTTP request, before any
call runs, and the calls over the limit answer 429 with ``retry_after`` without running.

Who pays:

1. The caller is identified first (``RpcContext.identify``: from this process's memory
   of tokens, or one lookup that the calls then reuse).
2. A valid token: the bucket of its **user** (``user:<id>``, shared by all the user's
   tokens), ``RPC_SERVER_RATE_LIMIT`` calls per second refilling ``RPC_SERVER_RATE_BURST``.
3. No token, a token that does not authenticate, or several ``Authorization`` headers:
   the bucket of the **client address** (``ip:<address>``, IPv6 per /64; see
   ``rpc_server.http.client_address``), ``RPC_SERVER_ANONYMOUS_RATE_LIMIT`` refilling
   ``RPC_SERVER_ANONYMOUS_RATE_BURST``. No bucket is ever keyed on a token that did not
   authenticate.
4. Each client may cause failed token lookups at the anonymous rate (and burst), per
   process. Past that, a token this process knows nothing of (neither remembered as
   valid nor as unknown: ``rpc_server.jsonrpc.token_cache``) is not looked up at all: the
   request answers 429. With the memory of unknown tokens this bounds the database
   lookups a flood of garbage tokens can cause, new or repeated, by the client's own
   budget. The price: while a client floods garbage tokens, a valid token this process
   has never seen, sent from that same address, waits too; tokens that have
   authenticated here before (and requests without a token) are not held back.
5. A token that cannot be checked because the database is unreachable is not counted:
   every call of that request answers -32000 from that one failed lookup, doing nothing.

``0`` as either rate turns that limit off.

What each call costs: one per valid request object (an invalid one is answered -32600
without running); ``rpc.discover`` counts as 10 (``CALL_COSTS``): its answer is the
~13 KB OpenRPC document, serialized once per process, so it is cheap to make but heavy
to send; a cost is never more than the burst. A request's calls run in order while the
granted budget lasts; from the first that does not fit, the rest answer 429, each with
the seconds after which its own cost would fit.

When the bucket store (PostgreSQL) is down, the limits **fail over to this process's
memory**, neither open nor closed (``rpc_server.jsonrpc.buckets.FallbackBuckets``). Not open: the
outage must not lift the limits, since the one call that needs no database,
``rpc.discover``, is the amplification an attacker wants, and an attacker able to exhaust
the connection pool would otherwise switch the limits off. Not closed: refusing every
call would turn a limiter hiccup (a pool timeout under load) into an outage for
well-behaved clients whose calls could succeed. In memory each process counts on its
own, so during the outage a client can get up to one burst per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rpc_server.config import Settings
from rpc_server.db.connection import Engine
from rpc_server.jsonrpc.buckets import (
    Buckets,
    CoalescedBuckets,
    DatabaseBuckets,
    FallbackBuckets,
    LeasedBuckets,
    Limit,
    MemoryBuckets,
)
from rpc_server.jsonrpc.context import RpcContext

# Calls that weigh more than one; every other call costs 1.
CALL_COSTS = {"rpc.discover": 10}


def cost_of(request: Any) -> int:
    """What a valid request object costs."""
    method = request.get("method") if isinstance(request, dict) else None
    return CALL_COSTS.get(method, 1) if isinstance(method, str) else 1


class RateLimits:
    """Per-user and per-client-address limits over one bucket store."""

    def __init__(
        self,
        buckets: Buckets,
        *,
        per_user: Limit | None,
        anonymous: Limit | None,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.buckets, self.per_user, self.anonymous = buckets, per_user, anonymous
        # The failed token lookups each client may still cause, in this process: a bucket
        # per client that refills like the anonymous limit.
        self._failed_lookups = MemoryBuckets(max_keys=max_clients, clock=clock)
        # Requests refused before their token was looked up.
        self.lookups_refused = 0

    async def admit(self, ctx: RpcContext, costs: Sequence[int]) -> list[float | None]:
        """For each call (by its cost), None if it may run, else seconds to retry after."""
        if not costs:
            return []
        anonymous = self.anonymous
        new_token = anonymous is not None and ctx.token_is_new()
        if new_token and anonymous is not None:
            held = self._failed_lookups.holds(ctx.client, anonymous)
            if held < 1:
                self.lookups_refused += 1
                return [anonymous.retry_after(held)] * len(costs)
        try:
            actor = await ctx.identify()
        except Exception:
            # The token cannot be checked (database unavailable): each call answers
            # -32000 from this same failure and does nothing, so nothing is counted.
            return [None] * len(costs)
        if new_token and actor is None and anonymous is not None:
            await self._failed_lookups.take(ctx.client, 1, anonymous)
        if actor is not None:
            if self.per_user is None:
                return [None] * len(costs)
            key, limit = f"user:{actor.user_id}", self.per_user
        else:
            if anonymous is None:
                return [None] * len(costs)
            key, limit = f"ip:{ctx.client}", anonymous
        costs = [min(cost, limit.burst) for cost in costs]
        asked = sum(costs)
        grant = await self.buckets.take(key, asked, limit)
        if grant.granted >= asked:
            return [None] * len(costs)  # all of them (the usual case)
        verdicts: list[float | None] = []
        budget, refusing = grant.granted, False
        for cost in costs:
            refusing = refusing or cost > budget
            if refusing:
                verdicts.append(limit.retry_after(grant.tokens_left, cost))
            else:
                budget -= cost
                verdicts.append(None)
        return verdicts


def build_rate_limits(settings: Settings, engine: Engine) -> RateLimits | None:
    """The limits ``settings`` ask for, None if both are off: buckets in this process on
    SQLite (one process), in PostgreSQL otherwise (falling back to memory)."""
    per_user = Limit(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
    anonymous = (
        Limit(settings.anonymous_rate_limit, settings.anonymous_rate_burst)
        if settings.anonymous_rate_limit
        else None
    )
    limits = [limit for limit in (per_user, anonymous) if limit is not None]
    if not limits:
        return None
    memory = MemoryBuckets()
    buckets: Buckets = memory
    if engine.dialect_name != "sqlite":
        idle_after = max(limit.full_after for limit in limits)
        shared = CoalescedBuckets(DatabaseBuckets(engine, idle_after=idle_after))
        buckets = FallbackBuckets(LeasedBuckets(shared), memory)
    return RateLimits(buckets, per_user=per_user, anonymous=anonymous)
