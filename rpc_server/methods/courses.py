"""course.list."""

from __future__ import annotations

from rpc_server.domain import services
from rpc_server.domain.records import Actor, Course
from rpc_server.jsonrpc.context import RpcContext


async def list_courses(ctx: RpcContext, actor: Actor | None) -> list[Course]:
    """List the courses on sale, by slug. Needs no token."""
    return await services.list_courses(ctx.uow)
