"""registration.list."""

from __future__ import annotations

from rpc_server.context import RpcContext
from rpc_server.domain import services
from rpc_server.domain.records import Actor, Registration


async def list_registrations(ctx: RpcContext, actor: Actor) -> list[Registration]:
    """List the caller's own course registrations, newest first."""
    return await services.list_registrations(ctx.uow, actor)
