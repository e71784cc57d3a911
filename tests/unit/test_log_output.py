"""Log lines: written a loop iteration's worth at a time (when, in what order), and what
they look like (escaped text, or one JSON object each)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer, format_trace_id

from rpc_server.http.request_id import RequestIdFilter, current_request_id
from rpc_server.log_output import LoopBatchedStreamHandler, escape, formatter, plain_handler
from rpc_server.observability.tracing import TraceIdFilter


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


# --- trace ids (tracing on) -------------------------------------------------------------

TRACE_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    """A tracer of an SDK provider of the test's own: its spans have real trace ids."""
    provider = TracerProvider()
    yield provider.get_tracer("test_log_output")
    provider.shutdown()


def traced_logger(stream: io.StringIO, log_format: str) -> logging.Logger:
    """A logger writing as ``configure_logging(..., trace_ids=True)`` sets up: the
    batching handler, the trace-id format and both id filters."""
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(formatter(log_format, trace_ids=True))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(TraceIdFilter())
    log = logging.getLogger(f"test_log_output.traced.{log_format}.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.handlers = [handler]
    return log


async def test_a_text_line_logged_inside_a_span_carries_its_trace_id_and_outside_a_dash(
    stream: RecordingStream, tracer: Tracer
) -> None:
    log = traced_logger(stream, "text")
    token = current_request_id.set("req-7")
    try:
        with tracer.start_as_current_span("POST /rpc") as span:
            log.info("inside")
        log.info("outside")
        # Held until the loop comes round, yet stamped with the span it was logged in.
        assert stream.writes == []
        await asyncio.sleep(0)
    finally:
        current_request_id.reset(token)
    trace_id = format_trace_id(span.get_span_context().trace_id)
    assert TRACE_ID.fullmatch(trace_id)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(f" INFO {log.name} [req-7] trace={trace_id} inside")
    assert outside.endswith(f" INFO {log.name} [req-7] trace=- outside")


def test_a_json_line_logged_inside_a_span_carries_its_trace_id_and_outside_a_dash(
    stream: RecordingStream, tracer: Tracer
) -> None:
    log = traced_logger(stream, "json")
    with tracer.start_as_current_span("POST /rpc") as span, tracer.start_as_current_span("call"):
        log.info("inside", extra={"status": 200})
    log.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    trace_id = format_trace_id(span.get_span_context().trace_id)
    # The fields in their order: the trace id right after the request id.
    assert list(inside) == [
        "level", "logger", "request_id", "trace_id", "message", "status", "time",
    ]  # fmt: skip
    assert inside["trace_id"] == trace_id  # the child span's trace: the same trace
    assert inside["message"] == "inside"
    assert outside["trace_id"] == "-"
    assert outside["message"] == "outside"


def test_two_spans_of_two_traces_give_two_trace_ids(
    stream: RecordingStream, tracer: Tracer
) -> None:
    log = traced_logger(stream, "text")
    with tracer.start_as_current_span("first"):
        log.info("one")
    with tracer.start_as_current_span("second"):
        log.info("two")
    ids = [TRACE_ID.search(line) for line in stream.getvalue().splitlines()]
    assert all(ids), stream.getvalue()
    assert ids[0] and ids[1] and ids[0].group() != ids[1].group()


def test_a_trace_id_given_with_the_record_is_kept(stream: RecordingStream) -> None:
    log = traced_logger(stream, "text")
    log.info("after the span ended", extra={"trace_id": "0af7651916cd43dd8448eb211c80319c"})
    assert stream.getvalue().endswith(
        "trace=0af7651916cd43dd8448eb211c80319c after the span ended\n"
    )


def test_without_trace_ids_the_formats_are_as_before(tracer: Tracer) -> None:
    with tracer.start_as_current_span("POST /rpc"):
        made = record("inside a span")
    line = formatter("text").format(made)
    assert formatter("text", trace_ids=False).format(made) == line
    assert "trace" not in line
    assert line.endswith(" INFO rpc_server.test [req-1] inside a span")
    assert list(json.loads(formatter("json").format(made))) == [
        "level", "logger", "request_id", "message", "time",
    ]  # fmt: skip


# configure_logging changes the process's root logger: run in a process of its own.
CONFIGURE_AND_LOG = """
import logging, sys
from rpc_server.log_output import configure_logging
configure_logging("info", sys.argv[1], trace_ids=sys.argv[2] == "on")
log = logging.getLogger("rpc_server.probe")
log.info("before any span")
if sys.argv[2] == "on":
    from opentelemetry.sdk.trace import TracerProvider
    tracer = TracerProvider().get_tracer("probe")
    with tracer.start_as_current_span("POST /rpc") as span:
        log.info("inside %s", format(span.get_span_context().trace_id, "032x"))
print(sorted({name.split(".")[0] for name in sys.modules if name.startswith("opentelemetry")}))
"""


def configured_process(log_format: str, trace_ids: str) -> tuple[list[str], str]:
    """The stderr lines and stdout of a process that configured logging and logged."""
    done = subprocess.run(
        [sys.executable, "-c", CONFIGURE_AND_LOG, log_format, trace_ids],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stderr.splitlines(), done.stdout.strip()


def test_configure_logging_with_trace_ids_stamps_every_line() -> None:
    lines, _ = configured_process("text", "on")
    before, inside = lines
    assert before.endswith(" INFO rpc_server.probe [-] trace=- before any span")
    match = re.search(
        r" INFO rpc_server\.probe \[-\] trace=([0-9a-f]{32}) inside ([0-9a-f]{32})$", inside
    )
    assert match, inside
    assert match.group(1) == match.group(2)  # the id of the span the line was logged in
    [as_json] = (json.loads(line) for line in configured_process("json", "on")[0][1:])
    assert as_json["trace_id"] == as_json["message"].removeprefix("inside ")


def test_configure_logging_without_trace_ids_writes_as_before_without_opentelemetry() -> None:
    lines, imported = configured_process("text", "off")
    [line] = lines
    assert line.endswith(" INFO rpc_server.probe [-] before any span")
    assert imported == "[]"  # the otel extra is not needed with tracing off
    [line] = configured_process("json", "off")[0]
    assert list(json.loads(line)) == ["level", "logger", "request_id", "message", "time"]


@given(
    st.lists(
        st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False), min_size=1, max_size=20
    )
)
def test_text_lines_show_the_time_as_logging_formats_it(moments: list[float]) -> None:
    """The text formatter formats the date and second once per second: each time it
    shows is still the one ``logging.Formatter`` would, whatever the order of records."""
    ours, standard = formatter("text"), logging.Formatter()
    for moment in sorted(moments) + moments:
        record = logging.makeLogRecord({"msg": "x"})
        record.created, record.msecs = moment, int((moment - int(moment)) * 1000)
        assert ours.formatTime(record) == standard.formatTime(record)
        assert ours.formatTime(record, "%H:%M") == standard.formatTime(record, "%H:%M")


# --- lines written without a record (the access log's) ----------------------------------


def plain_logger(stream: io.StringIO, name: str) -> tuple[logging.Logger, LoopBatchedStreamHandler]:
    """A logger set up as ``configure_logging`` sets up the root logger for text."""
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(formatter("text"))
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.filters[:] = []
    log.propagate, log.disabled = False, False
    log.setLevel(logging.INFO)
    return log, handler


@given(
    message=st.text(),
    name=st.sampled_from(["aiohttp.access", "test_log_output.plain", "x"]),
    request_id=st.sampled_from(["-", "abc-1", "0123456789abcdef0000000000000001"]),
    moment=st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
)
def test_a_plain_line_is_the_line_its_record_would_have_given(
    message: str, name: str, request_id: str, moment: float
) -> None:
    stream = io.StringIO()
    log, handler = plain_logger(stream, name)
    assert plain_handler(log) is handler
    reset = current_request_id.set(request_id)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(time, "time", lambda: moment)  # both read the clock through it
            log.info(message)  # a record: no arguments, so the message is as given
            handler.write_plain(name, message)
    finally:
        current_request_id.reset(reset)
    from_record, plain = stream.getvalue().splitlines(keepends=True)
    assert plain == from_record
    assert plain.startswith(time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(moment)))
    assert plain.endswith(f" INFO {name} [{request_id}] {escape(message, quotes=False)}\n")


def test_only_the_configured_plain_handler_untouched_takes_lines_without_records() -> None:
    stream = io.StringIO()
    name = "test_log_output.plain_handler"
    log, handler = plain_logger(stream, name)
    assert plain_handler(log) is handler
    child = logging.getLogger(f"{name}.child")  # reaches the handler through its parent
    assert plain_handler(child) is handler

    changes: list[Callable[[logging.Logger, LoopBatchedStreamHandler], object]] = [
        lambda log, handler: log.addFilter(logging.Filter("elsewhere")),
        lambda log, handler: log.addHandler(logging.StreamHandler(io.StringIO())),  # a capture
        lambda log, handler: handler.addFilter(TraceIdFilter()),  # trace ids on
        lambda log, handler: handler.setFormatter(formatter("json")),
        lambda log, handler: handler.setFormatter(formatter("text", trace_ids=True)),
        lambda log, handler: handler.setFormatter(logging.Formatter("%(message)s")),
        lambda log, handler: handler.setLevel(logging.WARNING),
        lambda log, handler: setattr(log, "disabled", True),
        lambda log, handler: setattr(log, "propagate", True),  # the root's would see it too
        lambda log, handler: log.removeHandler(handler),  # then the root's, or none
    ]
    for change in changes:
        log, handler = plain_logger(stream, name)
        change(log, handler)
        assert plain_handler(log) is None
    log, handler = plain_logger(stream, name)
    child.addFilter(logging.Filter("elsewhere"))  # a filter of the logger that logs
    try:
        assert plain_handler(child) is None and plain_handler(log) is handler
    finally:
        child.filters.clear()
