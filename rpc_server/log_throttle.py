"""Log lines that a client can cause, at most one per key (a client) per interval.

A client that floods the server with bad requests must not flood the log too: the first
line for a key is written, the next ones within ``interval`` seconds are only counted,
and the next line written says how many were left out. Used for failed authentications
(``rpc_server.jsonrpc.context``), keyed by client address. Bounded: the least recently used keys
are forgotten beyond ``max_keys``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable


class ThrottledLog:
    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        *,
        interval: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger, self.level, self.interval = logger, level, interval
        self.max_keys, self.clock = max_keys, clock
        # key -> (when the next line may be written, lines left out since the last one)
        self._keys: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def log(self, key: str, message: str, *args: object) -> bool:
        """Write ``message % args`` unless ``key`` had a line within the interval.

        Returns whether the line was written.
        """
        now = self.clock()
        quiet_until, left_out = self._keys.pop(key, (now, 0))
        if now < quiet_until:
            self._keys[key] = (quiet_until, left_out + 1)
            return False
        self._keys[key] = (now + self.interval, 0)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        if left_out:
            message += " (and %d more like it since the last such line)"
            args = (*args, left_out)
        self.logger.log(self.level, message, *args)
        return True
