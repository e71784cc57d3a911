"""The notifications a subscription receives, serialized: ``purchase.updated`` and
``purchase.resync``.

An update's result (the event and the purchase, through ``schemas.live``) is serialized
once per way of seeing it, not once per subscriber: staff and the payment backend see
who made a change; a buyer sees it for their own changes only
(``services.event_as_seen_by``). Each subscriber's message then only splices its
subscription id around those bytes.
"""

from __future__ import annotations

from rpc_server.domain.records import Actor, PurchaseUpdate
from rpc_server.domain.services import event_as_seen_by
from rpc_server.jsonrpc import json_codec
from rpc_server.live.feed import Delivery
from schemas.dumping import compile_dumper
from schemas.live import PurchaseResyncOut, PurchaseUpdateOut

UPDATED = "purchase.updated"
RESYNC = "purchase.resync"

_dump_update = compile_dumper(PurchaseUpdateOut())
_dump_resync = compile_dumper(PurchaseResyncOut())


def _notification(method: str, subscription_id: str, result: object) -> bytes:
    return json_codec.dumps(
        {
            "jsonrpc": "2.0",
            "method": method,
            "params": {"subscription": subscription_id, "result": result},
        }
    )


def updated(subscription_id: str, delivery: Delivery, viewer: Actor) -> bytes:
    """The ``purchase.updated`` notification of ``delivery`` for ``viewer``'s subscription."""
    update = delivery.update
    # Whether the viewer sees the event as stored or with its actor hidden.
    seen = event_as_seen_by(viewer, update.event)
    key = seen is update.event
    fragment = delivery.rendered.get(key)
    if fragment is None:
        result = _dump_update(PurchaseUpdate(event=seen, purchase=update.purchase))
        fragment = delivery.rendered[key] = json_codec.Fragment(json_codec.dumps(result))
    return _notification(UPDATED, subscription_id, fragment)


def resync(subscription_id: str, seq: int, reason: str) -> bytes:
    """The ``purchase.resync`` notification: replay impossible, updates follow from ``seq``."""
    return _notification(RESYNC, subscription_id, _dump_resync({"seq": seq, "reason": reason}))
