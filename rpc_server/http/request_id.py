"""Request ids: one per HTTP request, echoed in ``X-Request-ID`` and stamped on log lines.

A client's own ``X-Request-ID`` is kept when it is a sane token, so a frontend can
correlate its logs with ours; otherwise a fresh one is made. The id lives in a context
variable, which asyncio copies into every task a request starts (batch items included).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
from contextvars import ContextVar

from aiohttp import web
from aiohttp.typedefs import Handler

HEADER = "X-Request-ID"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

current_request_id: ContextVar[str] = ContextVar("request_id", default="-")


# A new id is this process's random prefix and a counter: unique across processes and
# restarts (the prefix is 64 random bits), and far cheaper than a uuid4 per request,
# which reads the system's random source every time.
_PREFIX = secrets.token_hex(8)
_counter = itertools.count(1)


def _start_afresh() -> None:
    """A forked process (a gunicorn worker) is a new process: its own prefix, count from 1."""
    global _PREFIX, _counter
    _PREFIX = secrets.token_hex(8)
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_start_afresh)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_counter):016x}"


def request_id_for(request: web.Request) -> str:
    """Return the client's request id if acceptable, else a new one."""
    offered = request.headers.get(HEADER)
    if offered is not None and _ACCEPTABLE.fullmatch(offered):
        return offered
    return new_request_id()


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_for(request)
    reset = current_request_id.set(request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404, 405 and friends are raised, not returned
        exc.headers[HEADER] = request_id
        raise
    finally:
        current_request_id.reset(reset)
    response.headers[HEADER] = request_id
    return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record, for formats that print ``%(request_id)s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True
