"""The one timer that cuts single calls past their timeout (rpc_server.jsonrpc.call_timer).

Each test times calls as ``RpcMethod.__call__`` does: ``start`` before the call, ``cut``
if it ends with ``CancelledError``, ``end`` otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rpc_server.jsonrpc.call_timer import CallTimer


async def timed(timer: CallTimer, seconds: float, call: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``call`` under ``timer``: its result, or "timed out" if the timer cut it."""
    watch = timer.start(seconds)
    try:
        result = await call()
    except asyncio.CancelledError:
        if watch.cut():
            return "timed out"
        raise
    except BaseException:
        watch.end()
        raise
    watch.end()
    return result


def sleeping(seconds: float, result: Any = "done") -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        await asyncio.sleep(seconds)
        return result

    return call


async def test_a_call_past_its_timeout_is_cut_and_its_task_goes_on() -> None:
    timer = CallTimer()
    started = time.monotonic()
    assert await timed(timer, 0.05, sleeping(5)) == "timed out"
    assert 0.04 < time.monotonic() - started < 1
    task = asyncio.current_task()
    assert task is not None
    # The cut was taken back: the task is not left cancelling, and it can still wait.
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)
    assert timer.in_flight() == 0


async def test_calls_within_their_timeout_are_untouched() -> None:
    timer = CallTimer()
    results = await asyncio.gather(*(timed(timer, 1.0, sleeping(0.01, n)) for n in range(50)))
    assert results == list(range(50))
    assert timer.in_flight() == 0


async def test_only_the_calls_past_their_deadline_are_cut() -> None:
    timer = CallTimer()
    durations = [0.01, 0.5, 0.02, 0.6, 0.0, 0.03]
    results = await asyncio.gather(
        *(timed(timer, 0.2, sleeping(seconds, index)) for index, seconds in enumerate(durations))
    )
    assert results == [0, "timed out", 2, "timed out", 4, 5]
    assert timer.in_flight() == 0


async def test_calls_started_one_after_another_are_each_cut_at_their_own_deadline() -> None:
    timer = CallTimer()

    async def later(delay: float) -> tuple[Any, float]:
        await asyncio.sleep(delay)
        started = time.monotonic()
        result = await timed(timer, 0.1, sleeping(5))
        return result, time.monotonic() - started

    outcomes = await asyncio.gather(*(later(delay) for delay in (0.0, 0.03, 0.06, 0.09)))
    for result, elapsed in outcomes:
        assert result == "timed out"
        assert 0.09 < elapsed < 0.5, elapsed


async def test_a_shorter_timeout_after_a_longer_one_is_not_kept_waiting() -> None:
    timer = CallTimer()
    long = asyncio.ensure_future(timed(timer, 10.0, sleeping(0.5, "long")))
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await timed(timer, 0.05, sleeping(5)) == "timed out"
    assert time.monotonic() - started < 0.4
    assert await long == "long"


async def test_a_cancellation_from_elsewhere_propagates() -> None:
    timer = CallTimer()
    task = asyncio.ensure_future(timed(timer, 10.0, sleeping(5)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert timer.in_flight() == 0


async def test_a_cancellation_from_elsewhere_at_the_deadline_still_propagates() -> None:
    """The timer and a shutdown cancel the same call: it is not answered as timed out."""
    timer = CallTimer()
    cancelled = asyncio.Event()

    async def call() -> Any:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            await asyncio.sleep(0.2)  # still cleaning up when the shutdown comes
            raise

    task = asyncio.ensure_future(timed(timer, 0.05, call))
    await cancelled.wait()
    task.cancel()  # the shutdown's cancellation, on top of the timer's
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_call_that_swallows_the_cut_keeps_its_answer_and_its_task_is_clean() -> None:
    timer = CallTimer()
    task = asyncio.current_task()
    assert task is not None

    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "finished anyway"
        return "not cut"

    assert await timed(timer, 0.05, stubborn) == "finished anyway"
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled by a leftover request


async def test_a_call_failing_after_its_deadline_fails_as_itself() -> None:
    timer = CallTimer()

    async def failing() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    with pytest.raises(ValueError, match="cleanup failed"):
        await timed(timer, 0.05, failing)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_timer_is_armed_again_on_a_new_event_loop() -> None:
    """One app may be served on several loops, one after another (tests do so)."""
    timer = CallTimer()
    assert await timed(timer, 0.05, sleeping(5)) == "timed out"
    other_loop_result: list[Any] = []

    def on_other_loop() -> None:
        other_loop_result.append(asyncio.run(timed(timer, 0.05, sleeping(5))))
        other_loop_result.append(asyncio.run(timed(timer, 1.0, sleeping(0, "quick"))))

    await asyncio.to_thread(on_other_loop)
    assert other_loop_result == ["timed out", "quick"]
    assert await timed(timer, 0.05, sleeping(5)) == "timed out"


async def test_a_call_is_timed_inside_a_task_only() -> None:
    timer = CallTimer()
    loop = asyncio.get_running_loop()
    outcome: list[BaseException] = []

    def outside_any_task() -> None:
        try:
            timer.start(1.0)
        except RuntimeError as exc:
            outcome.append(exc)

    loop.call_soon(outside_any_task)
    await asyncio.sleep(0.01)
    assert len(outcome) == 1 and "inside a task" in str(outcome[0])
