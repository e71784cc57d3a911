"""Baseline (a), the floor: a bare aiohttp handler answering ``rpc.discover`` by hand.

It is what the trivial workloads compare the project's ``rpc.discover`` with: no
middleware, no access log, no jsonrpcserver, the standard library's ``json``. Like the
project it answers with a prebuilt document (the OpenRPC document the harness wrote to
``--document``); the document is serialized once at start, each answer splices it
between the envelope's bytes. Batches are answered item by item, in order.

Run by the harness as ``python -m tests.benchmarks.floor --port P --document PATH``.
It imports nothing from the project.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.benchmarks import instrumentation

DOCUMENT_BYTES = web.AppKey("document_bytes", bytes)


def answer_item(item: Any, document: bytes) -> bytes | None:
    """One request object in, its answer's bytes out (None for a notification)."""
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        return b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}'
    if "id" not in item:
        return None
    id_ = json.dumps(item["id"]).encode()
    if item.get("method") != "rpc.discover":
        return b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":' + (
            id_ + b"}"
        )
    return b'{"jsonrpc":"2.0","result":' + document + b',"id":' + id_ + b"}"


async def handle_rpc(request: web.Request) -> web.Response:
    document = request.app[DOCUMENT_BYTES]
    try:
        payload = json.loads(await request.read())
    except ValueError:
        body = b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'
        return web.Response(body=body, content_type="application/json")
    if isinstance(payload, list):
        answers = [a for a in (answer_item(item, document) for item in payload) if a is not None]
        if not answers:
            return web.Response(status=204)
        body = b"[" + b",".join(answers) + b"]"
    else:
        single = answer_item(payload, document)
        if single is None:
            return web.Response(status=204)
        body = single
    return web.Response(body=body, content_type="application/json")


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(document: Path) -> web.Application:
    app = web.Application()
    parsed = json.loads(document.read_text())
    app[DOCUMENT_BYTES] = json.dumps(parsed, separators=(",", ":")).encode()
    app.router.add_post("/rpc", handle_rpc)
    app.router.add_get("/healthz", handle_healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--document", type=Path, required=True, help="the OpenRPC document (JSON)")
    instrumentation.add_arguments(parser)
    args = parser.parse_args()
    app = create_app(args.document)
    instrumentation.attach(app, args)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
