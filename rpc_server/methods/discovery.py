"""rpc.discover: the OpenRPC document of this server."""

from __future__ import annotations

from typing import Any

from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import RpcContext

# The schema OpenRPC gives for the result of rpc.discover: its own meta-schema.
META_SCHEMA_URL = "https://raw.githubusercontent.com/open-rpc/meta-schema/master/schema.json"


async def discover(ctx: RpcContext, actor: Actor | None) -> Any:
    """Describe this server's methods as an OpenRPC document.

    The same document is served at GET /openrpc.json, and as a readable page at GET /docs.
    """
    return ctx.service_description
