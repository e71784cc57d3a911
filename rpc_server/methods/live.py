"""rpc.authenticate, purchase.subscribe and purchase.unsubscribe: over a WebSocket only.

They act on the connection the call came on (``ctx.live``, ``rpc_server.live``); over
plain HTTP there is none, and they answer Method not found with the reason.
"""

from __future__ import annotations

from rpc_server.domain import services
from rpc_server.domain.errors import Unauthenticated, WebSocketOnly
from rpc_server.domain.records import Actor
from rpc_server.jsonrpc.context import LiveSession, RpcContext


def _connection(ctx: RpcContext, method: str) -> LiveSession:
    if ctx.live is None:
        raise WebSocketOnly(method)
    return ctx.live


async def authenticate(ctx: RpcContext, actor: Actor | None, *, token: str) -> Actor:
    """Authenticate this WebSocket connection with a bearer token.

    For clients that cannot send an Authorization header with the upgrade (browsers):
    call it first, within RPC_SERVER_WS_AUTH_TIMEOUT seconds of connecting, or the
    connection is closed with 1008. Once per connection (409 after that); a wrong
    token answers 401 and the connection may try again until the timeout.
    """
    live = _connection(ctx, "rpc.authenticate")
    holder = await services.authenticate(ctx.uow, token)
    if holder is None:
        raise Unauthenticated("Unauthenticated: the token is unknown, expired or revoked")
    live.authenticated(token, holder)
    ctx.authenticated_as(token, holder)
    return holder


async def subscribe(
    ctx: RpcContext, actor: Actor, *, purchase_id: str | None = None, since: int | None = None
) -> str:
    """Receive purchase.updated notifications; returns the subscription id.

    Every state change of the purchases the caller may see (as purchase.list: a buyer's
    own, every purchase for staff), or of purchase_id alone. With since (an event's seq),
    first every change after it, in order, exactly once, then live ones; when since is
    older than the replay window, one purchase.resync notification instead. No
    notification precedes this answer.
    """
    live = _connection(ctx, "purchase.subscribe")
    await live.ready()
    scope, latest = await services.update_scope(
        ctx.uow, actor, purchase_id=purchase_id, since=since
    )
    # Without since: the changes committed after this call, not after whatever this
    # process's feed has read so far (it may lag behind the latest commit).
    return live.subscribe(actor, scope, latest if since is None else since)


async def unsubscribe(ctx: RpcContext, actor: Actor, *, subscription: str) -> bool:
    """End a subscription of this connection: true, or false when it has none of that id."""
    return _connection(ctx, "purchase.unsubscribe").unsubscribe(subscription)
