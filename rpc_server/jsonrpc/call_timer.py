"""One timer for the timeouts of every single call an app runs (``RPC_SERVER_CALL_TIMEOUT``).

A call that is not a batch item runs in its HTTP request's (or WebSocket frame's) own
task; past its timeout that task is cancelled at the call's await and the call answers
-32001 (``RpcMethod.__call__``). ``asyncio.timeout`` does this with a timer per call: a
handle pushed on the event loop's heap and cancelled a few hundred microseconds later
(about 4 µs a call, 2 % of a ``purchase.get`` on SQLite: tests/benchmarks/profile.md).
Here the calls in flight are kept in the order they started (a ``Watch`` each: the
task and its deadline), and one timer is armed at the soonest deadline; when it fires,
it cancels the tasks whose deadline has passed and is armed again at the next one.
Every call of an app has the same timeout, so deadlines come in order and the timer
fires about once per timeout, not once per call.

The cancellation is ``asyncio.timeout``'s protocol, on the task's public counters: the
timer calls ``task.cancel()``; when the call ends with ``CancelledError``, ``Watch.cut``
takes that one cancellation back (``task.uncancel()``) and says whether it was the only
one. A cancellation from anywhere else (the server shutting down, the client gone) is
never mistaken for a timeout: it propagates.

Batch items have their lanes' timers instead (``rpc_server.jsonrpc.envelope.answer``).
"""

from __future__ import annotations

import asyncio
import time

# asyncio runs a timer this much before its time (``BaseEventLoop._run_once``'s end
# time): the watches due within it are due when the timer fires.
_RESOLUTION = time.get_clock_info("monotonic").resolution


class Watch:
    """One call being timed (``CallTimer.start``); ``end`` or ``cut`` when it ends."""

    __slots__ = ("cancelling", "deadline", "expired", "task", "timer")

    def __init__(self, timer: CallTimer, task: asyncio.Task[object], deadline: float) -> None:
        self.timer, self.task, self.deadline = timer, task, deadline
        # Cancellations already asked of the task when the call began (asyncio.timeout's
        # ``_cancelling``): more than that at the end means someone else cancelled too.
        self.cancelling = task.cancelling()
        self.expired = False

    def end(self) -> None:
        """The call ended with a result or an exception other than ``CancelledError``.

        If the timer cancelled the task just as the call finished (the cancellation
        was swallowed, or came after the last await), the cancellation is taken back:
        the call's answer stands.
        """
        self.timer.forget(self)
        if self.expired:
            self.task.uncancel()

    def cut(self) -> bool:
        """The call ended with ``CancelledError``: True if this timer alone caused it (then
        the caller answers -32001 and the cancellation goes no further), False if the
        cancellation came (also) from elsewhere and must propagate."""
        self.timer.forget(self)
        if not self.expired:
            return False
        return self.task.uncancel() <= self.cancelling


class CallTimer:
    """The single calls in flight on one event loop and the one timer that cuts them."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # In order of start (an ordered set: a task could time a call inside a call).
        self._watches: dict[Watch, None] = {}
        self._handle: asyncio.TimerHandle | None = None

    def start(self, timeout: float) -> Watch:
        """Time the call the current task is about to run: cancel the task if the call
        has not ended ``timeout`` seconds from now."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # An app served on a new loop (tests run many): nothing of the old one is
            # still running.
            self._loop, self._watches, self._handle = loop, {}, None
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a call is timed inside a task")
        watch = Watch(self, task, loop.time() + timeout)
        self._watches[watch] = None
        if self._handle is None or watch.deadline < self._handle.when():
            self._arm(watch.deadline)
        return watch

    def forget(self, watch: Watch) -> None:
        self._watches.pop(watch, None)

    def in_flight(self) -> int:
        """The calls being timed now (for tests)."""
        return len(self._watches)

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        self._handle = None
        now = self._loop.time() + _RESOLUTION
        soonest: float | None = None
        for watch in self._watches:
            if watch.expired:
                continue  # cancelled already, not yet ended
            if watch.deadline <= now:
                watch.expired = True
                watch.task.cancel()
            elif soonest is None or watch.deadline < soonest:
                soonest = watch.deadline
        if soonest is not None:
            self._arm(soonest)
