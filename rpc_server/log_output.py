"""Where log lines go and what they look like: stderr, a loop iteration's worth at a time.

``configure_logging`` sets it up, once per process (the CLI's ``main``).

At INFO the access log writes one line per HTTP request. Written one by one, each line
costs a ``write`` system call, and measured here that was about 40 µs of server CPU
per request: more than jsonrpcserver's whole dispatch of a cheap call
(``tests/benchmarks/profile.md``). So lines below WARNING that are logged on the event
loop's thread are kept until the loop has run the callbacks it had ready, then written
together with one ``write``: nothing waits for a timer, and nothing is held while the
loop waits for I/O. A WARNING or worse is written at once, after the lines before it,
and so is any line logged on a thread without a running event loop (the database
driver's threads, the CLI). ``logging.shutdown`` (at exit) flushes what is left.

A line is one line, whatever a client sends: ``formatter("text")`` writes the control
characters of a message (a newline, a carriage return, an escape sequence) as ``\\xHH``
escapes, and the access log escapes its quoted fields (``escape``), so a request can
neither add a line nor forge a field. ``formatter("json")`` (``RPC_SERVER_LOG_FORMAT=json``)
makes every line one JSON object (python-json-logger), the access log's fields included.

With tracing on (``RPC_SERVER_TRACING``), ``trace_ids=True`` stamps each line with the
trace id of the span it was logged in (``trace=<32 hex>`` after the request id, or
``trace_id`` in JSON; ``-`` outside a span), so that a request's lines and its spans
join up. Without it the lines are exactly as before, and OpenTelemetry is not imported.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from rpc_server.http.request_id import RequestIdFilter, current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# The same with the trace id (``trace_ids=True``).
TRACED_TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [%(request_id)s] trace=%(trace_id)s %(message)s"
)
# The fields every JSON line starts with; a record's extra fields follow (the access
# log's method, path, status, …), then exc_info for an exception's traceback.
JSON_FIELDS = ("levelname", "name", "request_id", "message")
TRACED_JSON_FIELDS = ("levelname", "name", "request_id", "trace_id", "message")
JSON_RENAMED = {"levelname": "level", "name": "logger"}


def configure_logging(level: str, log_format: str = "text", *, trace_ids: bool = False) -> None:
    """Log to stderr, each line stamped with the id of the request it belongs to (and,
    with ``trace_ids``, of the trace), as escaped text or JSON (``formatter``), written
    a loop iteration's lines at a time (``LoopBatchedStreamHandler``). Called once per
    process by the CLI; gunicorn's workers inherit it with the fork."""
    handler = LoopBatchedStreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, trace_ids=trace_ids))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for installed in logging.getLogger().handlers:
        installed.addFilter(RequestIdFilter())
        if trace_ids:
            installed.addFilter(_trace_id_filter())


def _trace_id_filter() -> logging.Filter:
    # Imported here: OpenTelemetry is the optional otel extra, needed only with tracing.
    from rpc_server.observability.tracing import TraceIdFilter

    return TraceIdFilter()


def escape(text: str, *, quotes: bool = True) -> str:
    """``text`` with every character that could end a line or a quoted field escaped.

    Control and other unprintable characters (line and paragraph separators and lone
    surrogates included) become ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH``; with ``quotes``,
    ``"`` and ``\\`` too, so that a quoted field can be read back unambiguously. The
    usual printable text is returned as it is, after one scan at C speed.
    """
    if text.isprintable() and not (quotes and ('"' in text or "\\" in text)):
        return text
    special = '"\\' if quotes else ""
    return "".join(
        _escaped(char) if not char.isprintable() or char in special else char for char in text
    )


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class EscapingFormatter(logging.Formatter):
    """The text format, each message kept on its line (a traceback below it is the
    server's own text, and stays as it is).

    The time is ``logging.Formatter``'s default (``2026-12-04 15:18:17,123``), its
    date and second formatted once per second rather than once per line."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second: int | None = None
        self._second_text = ""
        # Whether ``plain_line`` can make this formatter's lines (TEXT_FORMAT's).
        self.plain = fmt == TEXT_FORMAT

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        # Called with the handler's lock held: one line at a time.
        second = int(created)
        if second != self._second:
            when = self.converter(created)
            self._second_text = time.strftime(self.default_time_format, when)
            self._second = second
        if self.default_msec_format is None:
            return self._second_text
        return self.default_msec_format % (self._second_text, msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        record.message = escape(record.message, quotes=False)
        return super().formatMessage(record)

    def plain_line(
        self, name: str, levelno: int, request_id: str, message: str, created: float
    ) -> str:
        """The line ``format`` makes of a record of logger ``name`` at ``levelno`` whose
        message is ``message`` (no arguments, no exception), made at ``created`` in
        request ``request_id`` (what ``RequestIdFilter`` sets), with TEXT_FORMAT
        (``plain``): without making the record. Called with the handler's lock held."""
        # LogRecord's milliseconds, as it computes them.
        msecs = int((created - int(created)) * 1000) + 0.0
        return (
            f"{self._time(created, msecs)} {logging.getLevelName(levelno)} {name} "
            f"[{request_id}] {escape(message, quotes=False)}"
        )


def formatter(log_format: str, *, trace_ids: bool = False) -> logging.Formatter:
    """The formatter of ``RPC_SERVER_LOG_FORMAT``: ``text`` or ``json``; with
    ``trace_ids``, each line shows the record's ``trace_id`` (``TraceIdFilter`` sets it)."""
    if log_format == "json":
        return JsonFormatter(
            TRACED_JSON_FIELDS if trace_ids else JSON_FIELDS,
            rename_fields=JSON_RENAMED,
            timestamp="time",
            json_ensure_ascii=True,
        )
    return EscapingFormatter(TRACED_TEXT_FORMAT if trace_ids else TEXT_FORMAT)


class LoopBatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that writes the lines of one loop iteration together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The thread, and its event loop, that will call ``flush`` (None: none will).
        self._flush_scheduled_on: tuple[int, asyncio.AbstractEventLoop] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (``Handler.handle``).
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._queue(line, record.levelno)

    def write_plain(self, name: str, message: str) -> None:
        """Write what an INFO record of logger ``name`` with ``message`` (no arguments)
        would be written as, without making the record: only when ``plain_handler``
        returned this handler for that logger."""
        formatter = self.formatter
        assert isinstance(formatter, EscapingFormatter) and formatter.plain
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            line = formatter.plain_line(
                name, logging.INFO, current_request_id.get(), message, time.time()
            )
            self._queue(line + self.terminator, logging.INFO)

    def _queue(self, line: str, levelno: int) -> None:
        self._pending.append(line)
        if levelno < logging.WARNING:
            thread = threading.get_ident()
            scheduled = self._flush_scheduled_on
            if scheduled is not None and scheduled[0] == thread:
                if scheduled[1].is_running():
                    return  # this loop's flush is coming
                # That loop stopped before its flush ran: write now, and forget it.
                self._flush_scheduled_on = scheduled = None
            if scheduled is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None  # not an event loop's thread: write now
                if loop is not None:
                    self._flush_scheduled_on = (thread, loop)
                    loop.call_soon(self.flush)
                    return
        self._write_pending()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._flush_scheduled_on = None
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            # As StreamHandler does for a line it cannot write: report, do not raise.
            self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))


def plain_handler(logger: logging.Logger) -> LoopBatchedStreamHandler | None:
    """The handler an INFO record of ``logger`` reaches, when it is the only one and is
    ``configure_logging``'s as it set it up for plain text (its formatter ``plain``, its
    only filter the request id's) and nothing on the way could change the record (no
    filter on ``logger``, no other handler, ``logger`` not disabled): then a line for it
    can be written without making the record (``LoopBatchedStreamHandler.write_plain``),
    the same line. None otherwise (JSON lines, trace ids, a test's capturing handler,
    another filter): the record is made and handled as usual.

    The access log writes a line per request: 7.5 µs a line through a record, 3.0 µs
    this way (``tests/benchmarks/profile.md``, tenth round)."""
    if logger.disabled or logger.filters:
        return None
    node: logging.Logger | None = logger
    while node is not None and not node.handlers:
        node = node.parent if node.propagate else None
    if node is None or len(node.handlers) != 1:
        return None
    if node.propagate and node.parent is not None:
        return None  # its parents' handlers would have the record too
    handler = node.handlers[0]
    if type(handler) is not LoopBatchedStreamHandler or handler.level > logging.INFO:
        return None
    if len(handler.filters) != 1 or type(handler.filters[0]) is not RequestIdFilter:
        return None
    formatter = handler.formatter
    if type(formatter) is not EscapingFormatter or not formatter.plain:
        return None
    return handler
