"""The receipts benchmark's SMTP sink: accepts every message (aiosmtpd), counts them.

The harness starts it in its own process, pinned to the load's CPUs (never the server's),
and points the project at it with ``RPC_SERVER_SMTP_URL=smtp://127.0.0.1:PORT?starttls=0``.
It offers no STARTTLS and no AUTH, keeps nothing, and writes how many messages it has
accepted to ``--count-to`` every half second and when it stops (SIGTERM).

    python -m tests.benchmarks.smtp_sink --port P --count-to PATH
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

WRITE_EVERY = 0.5


class CountingHandler:
    """aiosmtpd's handler hook: every message is accepted and counted."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 Message accepted"


def write_count(path: Path, count: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(str(count))
    os.replace(temporary, path)


async def serve(host: str, port: int, count_to: Path) -> None:
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-sink", ident="bench-sink"), host, port
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    write_count(count_to, 0)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WRITE_EVERY)
        write_count(count_to, handler.messages)
    server.close()
    write_count(count_to, handler.messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-to", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.count_to))


if __name__ == "__main__":
    main()
