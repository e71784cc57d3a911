"""Per-token rate limiting: a token bucket, counted per call (each batch item is a call).

``RPC_SERVER_RATE_LIMIT`` calls per second refill a bucket of ``RPC_SERVER_RATE_BURST``;
``0`` turns limiting off. On PostgreSQL the bucket lives in the database, so every
server process shares it (one UPSERT per HTTP request, however many items it holds);
on SQLite it lives in the process. Buckets are keyed by the token's hash, never the
token itself.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass(frozen=True, slots=True)
class Grant:
    """How many of the requested calls may run, and when the next one could."""

    granted: int
    retry_after: float


class RateLimiter(Protocol):
    async def take(self, key: str, calls: int) -> Grant:
        """Take up to ``calls`` from ``key``'s bucket."""
        ...


def _retry_after(tokens_left: float, rate: float) -> float:
    return round(max(0.0, (1.0 - tokens_left) / rate), 3)


class MemoryRateLimiter:
    """One process's buckets; the least recently used are forgotten beyond ``max_keys``."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def take(self, key: str, calls: int) -> Grant:
        now = time.monotonic()
        tokens, updated = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        granted = min(calls, math.floor(tokens))
        tokens -= granted
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return Grant(granted, _retry_after(tokens, self.rate))


# Every expression in SET sees the row as it was, so refill and grant are computed from
# one consistent snapshot; the row lock serializes concurrent requests of one token.
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


class DatabaseRateLimiter:
    """Buckets in PostgreSQL, shared by every process of the deployment."""

    def __init__(self, engine: AsyncEngine, rate: float, burst: int):
        self.engine, self.rate, self.burst = engine, rate, burst

    async def take(self, key: str, calls: int) -> Grant:
        async with self.engine.begin() as connection:
            row = (
                await connection.execute(
                    _TAKE,
                    {"key": key, "calls": calls, "burst": self.burst, "rate": self.rate},
                )
            ).one()
        return Grant(int(row.last_granted), _retry_after(float(row.tokens), self.rate))
