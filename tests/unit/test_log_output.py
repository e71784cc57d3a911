"""Log lines: written a loop iteration's worth at a time (when, in what order), and what
they look like (escaped text, or one JSON object each)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from rpc_server.log_output import LoopBatchedStreamHandler, escape, formatter


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


# --- what a line looks like -------------------------------------------------------------


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "rpc_server.test", "levelno": logging.INFO, "levelname": "INFO",
         "msg": message, "args": args, "request_id": "req-1", **extra}
    )  # fmt: skip
    return made


@pytest.mark.parametrize(
    ("text", "quotes", "escaped"),
    [
        ("plain text, café 東京", True, "plain text, café 東京"),
        ('a "quoted" \\ field', True, "a \\x22quoted\\x22 \\x5c field"),
        ('a "quoted" \\ field', False, 'a "quoted" \\ field'),
        ("two\nlines\r\n", False, "two\\x0alines\\x0d\\x0a"),
        ("\x1b[2J\x00\x7f\x85\u2028\u2029\U000e0001", False,
         "\\x1b[2J\\x00\\x7f\\x85\\u2028\\u2029\\U000e0001"),
    ],
)  # fmt: skip
def test_escape_leaves_printable_text_and_escapes_the_rest(
    text: str, quotes: bool, escaped: str
) -> None:
    assert escape(text, quotes=quotes) == escaped


def test_text_lines_keep_a_message_on_its_line_and_a_traceback_below_it() -> None:
    text = formatter("text")
    line = text.format(record("user %s logged in", "eve\n2026-01-01 ERROR forged line"))
    assert line.endswith(
        "INFO rpc_server.test [req-1] user eve\\x0a2026-01-01 ERROR forged line logged in"
    )
    assert len(line.splitlines()) == 1
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("it failed", exc_info=sys.exc_info())
    lines = text.format(failed).splitlines()
    assert lines[0].endswith("[req-1] it failed")
    assert lines[1] == "Traceback (most recent call last):"  # the server's own text, as is


def test_json_lines_are_one_object_each_with_extra_fields_and_the_traceback() -> None:
    as_json = formatter("json")
    line = as_json.format(record('a "quoted"\nmessage %d', 7, status=201))
    assert "\n" not in line
    assert json.loads(line) == {
        "level": "INFO",
        "logger": "rpc_server.test",
        "request_id": "req-1",
        "message": 'a "quoted"\nmessage 7',
        "status": 201,
        "time": json.loads(line)["time"],
    }
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("it failed", exc_info=sys.exc_info())
    line = as_json.format(failed)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "it failed"
    assert "ValueError: boom" in fields["exc_info"]


async def test_json_lines_are_written_a_loop_iteration_at_a_time_too(
    stream: RecordingStream,
) -> None:
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(formatter("json"))
    log = logging.getLogger(f"test_log_output.json.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        for n in range(3):
            log.info("line %d", n, extra={"request_id": f"r{n}"})
        assert stream.writes == []
        await asyncio.sleep(0)
    finally:
        log.removeHandler(handler)
    [written] = stream.writes
    assert [json.loads(line)["message"] for line in written.splitlines()] == [
        "line 0", "line 1", "line 2",
    ]  # fmt: skip
