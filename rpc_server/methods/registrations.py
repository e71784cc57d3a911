"""registration.list."""

from __future__ import annotations

from rpc_server.domain import services
from rpc_server.domain.records import Actor, Registration, RegistrationPage
from rpc_server.jsonrpc.context import RpcContext
from schemas.registration import BARE_LIST_LIMIT


async def list_registrations(
    ctx: RpcContext, actor: Actor, *, limit: int | None = None, cursor: int | None = None
) -> RegistrationPage | list[Registration]:
    """List the caller's own course registrations newest first, a page at a time.

    With limit or cursor the answer is a page {items, next_cursor} (pass next_cursor
    back as cursor). Without params it is a bare array of the newest 100, as before
    registration.list took params.
    """
    if limit is None and cursor is None:
        page = await services.list_registrations(ctx.uow, actor, limit=BARE_LIST_LIMIT)
        return page.items
    return await services.list_registrations(ctx.uow, actor, limit=limit or 20, cursor=cursor)
