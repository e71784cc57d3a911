"""Tracing in a real ``rpc-server serve`` process: spans exported with OTLP over HTTP to
a collector (here a small aiohttp server decoding OpenTelemetry's own protobuf), and the
trace id on the process's log lines, the access line included.

Configured as an operator does: ``RPC_SERVER_TRACING=on`` and OpenTelemetry's own
``OTEL_EXPORTER_OTLP_ENDPOINT``; the caller's ``traceparent`` is continued.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.processes import free_port, running_server


async def test_spans_reach_the_collector_and_log_lines_carry_the_trace_id(
    database_url: str, tmp_path: Path
) -> None:
    exported: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        exported.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(status=200)

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(collector)
    await runner.setup()
    collector_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", collector_port).start()
    trace_id = secrets.token_hex(16)
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_TRACING": "on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    output: list[str] = []
    try:
        with running_server(env, output=output) as (port, _):
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/rpc",
                    json=[
                        {"jsonrpc": "2.0", "method": "course.list", "id": 1},
                        {"jsonrpc": "2.0", "method": "no.such.method", "id": 2},
                    ],
                    headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
                ) as response,
            ):
                assert response.status == 200
            for _ in range(100):  # exported in the background, within about 0.1 s
                if exported:
                    break
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    spans = [
        span
        for request in exported
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    names = sorted(span.name for span in spans if span.trace_id.hex() == trace_id)
    assert names == ["POST /rpc", "_OTHER", "course.list"]
    services = {
        attribute.value.string_value
        for request in exported
        for resource_spans in request.resource_spans
        for attribute in resource_spans.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {"rpc-server"}
    [log] = output
    access = [line for line in log.splitlines() if '"POST /rpc HTTP/1.1" 200' in line]
    assert len(access) == 1
    assert f"trace={trace_id}" in access[0]
    # Every log line has the field; those logged outside any request say "-".
    lines = [line for line in log.splitlines() if " INFO " in line or " WARNING " in line]
    assert lines and all("] trace=" in line for line in lines)
    assert any("] trace=- " in line for line in lines)
