"""Log lines written a loop iteration's worth at a time: when they are written, in order."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator

import pytest

from rpc_server.log_output import LoopBatchedStreamHandler


class RecordingStream(io.StringIO):
    """A stream that remembers each ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[RecordingStream]:
    yield RecordingStream()


@pytest.fixture
def logger(stream: RecordingStream) -> Iterator[logging.Logger]:
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(f"test_log_output.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    yield log
    log.removeHandler(handler)


async def test_lines_of_one_loop_iteration_go_out_in_one_write(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    for n in range(5):
        logger.info("line %d", n)
    assert stream.writes == []  # not yet: the loop has not come round
    await asyncio.sleep(0)
    assert stream.writes == ["".join(f"INFO line {n}\n" for n in range(5))]
    logger.info("next")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["INFO next\n"]


async def test_a_warning_is_written_at_once_after_the_lines_before_it(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("before")
    logger.warning("trouble")
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(stream.writes) == 1


def test_without_a_running_loop_a_line_is_written_at_once(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("from the CLI")
    assert stream.getvalue() == "INFO from the CLI\n"


async def test_a_line_from_another_thread_is_written_at_once_and_keeps_the_order(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("on the loop")
    thread = threading.Thread(target=logger.info, args=("from a driver thread",))
    thread.start()
    thread.join()
    assert stream.getvalue() == "INFO on the loop\nINFO from a driver thread\n"


async def test_shutdown_flushes_what_is_pending(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("last words")
    for handler in logger.handlers:
        handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue() == "INFO last words\n"


async def test_a_stream_that_fails_is_reported_not_raised(
    logger: logging.Logger, stream: RecordingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(stream, "write", broken)
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as in production
    logger.info("lost")
    await asyncio.sleep(0)  # the flush runs as a loop callback: it must not raise there
    logger.error("also lost")


def test_lines_held_for_a_loop_that_stopped_go_out_with_the_next_line(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    loop = asyncio.new_event_loop()
    try:
        # Logged by the loop's last callback: the flush it schedules never runs.
        loop.run_until_complete(asyncio.sleep(0, result=None))
        loop.call_soon(logger.info, "last words of the loop")
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert stream.getvalue() == ""  # held for a flush that will never come
    logger.info("after the loop")
    assert stream.getvalue() == "INFO last words of the loop\nINFO after the loop\n"
