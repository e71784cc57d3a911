"""JSON-RPC 2.0 over a WebSocket on ``GET /rpc``: live purchase updates (issue 18), in process.

Each test opens real WebSockets to the app (``aiohttp_client``) on SQLite and PostgreSQL
and proves one promise of the protocol (README, "Live updates"):

- Authentication: a bearer header on the upgrade, or ``rpc.authenticate`` (its result
  names the user and scope; a wrong token is 401 and the socket stays open; a second
  one is 409); a socket that has not authenticated is closed 1008 after
  ``RPC_SERVER_WS_AUTH_TIMEOUT``; a bad header token refuses the upgrade with HTTP 401
  and a JSON-RPC error body; a token in the query string counts for nothing; before
  authenticating only the methods that need no token work.
- The envelope: every protocol error is answered over the socket exactly as over HTTP
  POST (parse error, invalid request, batches, unknown method); notifications get no
  answer; a binary frame is an Invalid Request and the socket stays open; a frame over
  the body limit closes the socket 1009.
- Subscriptions: ids, unsubscribe (true once, then false; not across sockets);
  ``purchase.updated`` after a creation, a webhook fulfilment and a payments-token
  fulfilment, its shape equal to ``purchase.events``/``purchase.get``, seq increasing;
  the scope of ``purchase.list`` (another buyer sees nothing, staff sees everything);
  the ``purchase_id`` filter, and 404 for a purchase one cannot see; ``since`` replays
  exactly the missed events in order, then goes live; ``since`` ahead of the latest
  event is -32602; ``since`` older than ``RPC_SERVER_WS_REPLAY_WINDOW`` gets one
  ``purchase.resync`` then live updates; the per-socket cap holds against a batch of
  cap + 1 subscribes (cap ids, one 409); no notification of a subscription comes before
  the answer that names it.
- Over HTTP POST the WebSocket-only methods are -32601 saying so; a revoked token closes
  its socket 1008 within ``RPC_SERVER_WS_TOKEN_RECHECK``; past
  ``RPC_SERVER_WS_MAX_CONNECTIONS`` the upgrade is refused with HTTP 503.

Negative claims ("bob sees nothing of alice's") are proved without waiting for silence:
an event bob must see is made afterwards, and updates arrive in seq order, so anything
of alice's sent to bob would have come before it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from rpc_server.config import Settings
from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import World
from tests.e2e.conftest import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    AppClientFactory,
    assert_error,
    notification_object,
    request_object,
    send,
)
from tests.live_client import MESSAGE_TOO_BIG, POLICY_VIOLATION, LiveClient, bearer
from tests.payments import proof_for, webhook_request

UNAUTHENTICATED = 401
NOT_FOUND = 404
CONFLICT = 409

EVENT_FIELDS = {
    "seq", "purchase_id", "from_state", "to_state", "actor_scope", "actor_email", "source",
    "evidence", "payment_ref", "error_msg", "created_at",
}  # fmt: skip
PURCHASE_FIELDS = {
    "purchase_id", "course", "amount", "currency", "state", "error_msg", "created_at",
    "updated_at", "fulfilled_at",
}  # fmt: skip
# How late a timer-driven close may come, past its setting (a loaded test machine).
SLACK = 1.5


# --- helpers ------------------------------------------------------------------------------


@asynccontextmanager
async def live(client: TestClient[Any, Any], token: str | None = None) -> AsyncIterator[LiveClient]:
    """A WebSocket to the app's ``/rpc`` (with a bearer header when ``token`` is given)."""
    ws = await client.ws_connect("/rpc", headers=bearer(token) if token else {})
    async with LiveClient(ws) as socket:
        yield socket


async def result(
    client: TestClient[Any, Any], method: str, params: Any = None, *, token: str
) -> Any:
    """One call over HTTP POST; its result (failing the test on an error)."""
    reply = await send(client, request_object(method, params), token=token)
    assert reply.status == 200, reply
    body = reply.json
    assert "result" in body, body
    return body["result"]


async def create(
    client: TestClient[Any, Any], token: str, course: str = "python-basics"
) -> dict[str, Any]:
    purchase: dict[str, Any] = await result(
        client, "purchase.create", {"course": course}, token=token
    )
    return purchase


async def fulfil_as_payments(
    client: TestClient[Any, Any], world: World, purchase_id: str
) -> dict[str, Any]:
    """Fulfil with the payment backend's token (no proof needed)."""
    params = {"purchase_id": purchase_id, "purchase_state": "fulfilled"}
    answer: dict[str, Any] = await result(
        client, "purchase.fulfill", params, token=world.payments.token
    )
    return answer


async def fulfil_by_webhook(client: TestClient[Any, Any], purchase: dict[str, Any]) -> None:
    headers, body = webhook_request(proof_for(purchase, payment_ref="pi_live"))
    response = await client.post("/webhooks/payments", data=body, headers=headers)
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "applied"


async def history(
    client: TestClient[Any, Any], purchase_id: str, token: str
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await result(
        client, "purchase.events", {"purchase_id": purchase_id}, token=token
    )
    return events


async def latest_seq(client: TestClient[Any, Any], world: World) -> int:
    """The seq of the newest event of every purchase (read as staff, who sees them all)."""
    page = await result(client, "purchase.list", {"limit": 100}, token=world.staff.token)
    seqs = [
        event["seq"]
        for purchase in page["items"]
        for event in await history(client, purchase["purchase_id"], world.staff.token)
    ]
    return max(seqs, default=0)


def upgrade_headers(**extra: str) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **extra,
    }


async def next_frame(socket: LiveClient, after: int) -> Any:
    """Wait for the frame after the first ``after`` ones; return it."""
    await socket.wait_for(lambda: len(socket.frames) > after, what=f"frame {after + 1}")
    return socket.frames[after]


def answer_index(socket: LiveClient, id: Any) -> int:
    return next(
        n
        for n, frame in enumerate(socket.frames)
        if isinstance(frame, dict) and frame.get("id") == id
    )


def first_notification_index(socket: LiveClient, subscription: str) -> int | None:
    for n, frame in enumerate(socket.frames):
        if (
            isinstance(frame, dict)
            and "id" not in frame
            and frame.get("params", {}).get("subscription") == subscription
        ):
            return n
    return None


# --- authentication ---------------------------------------------------------------------


async def test_a_bearer_header_on_the_upgrade_authenticates_the_socket(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client, world.alice.token) as socket:
        purchase = await socket.result("purchase.create", {"course": "python-basics"})
        assert purchase["state"] == "pending"
        page = await socket.result("purchase.list")
        assert [p["purchase_id"] for p in page["items"]] == [purchase["purchase_id"]]
        # The socket is authenticated already: a second authentication is a conflict.
        answer = await socket.call("rpc.authenticate", {"token": world.bob.token})
        assert_error(answer, CONFLICT, answer["id"])
        assert socket.closed is None
    # It was alice's purchase, made over the socket.
    assert (
        await result(client, "purchase.get", [purchase["purchase_id"]], token=world.alice.token)
    )["purchase_id"] == purchase["purchase_id"]


async def test_rpc_authenticate_names_the_user_and_the_scope(
    client: TestClient[Any, Any], world: World
) -> None:
    for user, scope in (
        (world.alice, "buyer"),
        (world.staff, "staff"),
        (world.payments, "payments"),
    ):
        async with live(client) as socket:
            assert await socket.result("rpc.authenticate", {"token": user.token}) == {
                "user": user.email,
                "scope": scope,
            }
            assert "items" in await socket.result("purchase.list")
    # Params by position work as for every method.
    async with live(client) as socket:
        assert (await socket.result("rpc.authenticate", [world.bob.token]))[
            "user"
        ] == world.bob.email


async def test_a_wrong_token_is_401_the_socket_stays_open_and_a_second_authenticate_is_409(
    client: TestClient[Any, Any], world: World
) -> None:
    alices = await create(client, world.alice.token)
    async with live(client) as socket:
        wrong = await socket.call("rpc.authenticate", {"token": "rpcs_not-a-token-anyone-holds"})
        assert_error(wrong, UNAUTHENTICATED, wrong["id"])
        assert socket.closed is None
        assert len(await socket.result("course.list")) == 2
        refused = await socket.call("purchase.list")
        assert_error(refused, UNAUTHENTICATED, refused["id"])

        assert (await socket.result("rpc.authenticate", {"token": world.alice.token}))[
            "user"
        ] == world.alice.email
        page = await socket.result("purchase.list")
        assert [p["purchase_id"] for p in page["items"]] == [alices["purchase_id"]]

        again = await socket.call("rpc.authenticate", {"token": world.alice.token})
        assert_error(again, CONFLICT, again["id"])
        other = await socket.call("rpc.authenticate", {"token": world.bob.token})
        assert_error(other, CONFLICT, other["id"])
        # Still alice: bob's token did not take over the socket.
        page = await socket.result("purchase.list")
        assert [p["purchase_id"] for p in page["items"]] == [alices["purchase_id"]]


async def test_before_authenticating_only_the_methods_without_a_token_work(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client) as socket:
        assert [c["slug"] for c in await socket.result("course.list")] == [
            "python-basics",
            "sql-fundamentals",
        ]
        assert "openrpc" in await socket.result("rpc.discover")
        for method, params in (
            ("purchase.list", None),
            ("purchase.create", {"course": "python-basics"}),
            ("purchase.subscribe", {}),
            ("purchase.unsubscribe", {"subscription": "x"}),
        ):
            answer = await socket.call(method, params)
            assert_error(answer, UNAUTHENTICATED, answer["id"])
        assert socket.closed is None


async def test_a_token_in_the_query_string_counts_for_nothing(
    client: TestClient[Any, Any], world: World
) -> None:
    for query in (f"?token={world.alice.token}", f"?access_token={world.alice.token}"):
        ws = await client.ws_connect(f"/rpc{query}")
        async with LiveClient(ws) as socket:
            answer = await socket.call("purchase.list")
            assert_error(answer, UNAUTHENTICATED, answer["id"])


async def test_an_unauthenticated_socket_is_closed_1008_after_the_auth_timeout(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    timeout = 0.6
    client = await app_client(settings=replace(settings, ws_auth_timeout=timeout))
    opened = time.monotonic()
    async with (
        live(client) as silent,
        live(client) as wrong,
        live(client) as authenticated,
        live(client, world.bob.token) as by_header,
    ):
        await authenticated.result("rpc.authenticate", {"token": world.alice.token})
        # A wrong token does not stop the timer.
        answer = await wrong.call("rpc.authenticate", {"token": "rpcs_wrong"})
        assert_error(answer, UNAUTHENTICATED, answer["id"])

        for socket in (silent, wrong):
            closed = await socket.wait_closed(within=timeout + 5)
            assert closed.code == POLICY_VIOLATION, closed
            assert closed.reason.startswith("authentication"), closed
            assert timeout - 0.1 <= closed.at - opened <= timeout + SLACK, closed.at - opened
        # The authenticated ones outlive the timeout.
        assert "items" in await authenticated.result("purchase.list")
        assert "items" in await by_header.result("purchase.list")
        assert authenticated.closed is None and by_header.closed is None


async def test_a_bad_token_on_the_upgrade_is_refused_with_http_401_and_a_json_rpc_body(
    client: TestClient[Any, Any], world: World, uow_factory: SqlUnitOfWorkFactory
) -> None:
    revoked = await services.issue_token(uow_factory, "carol@example.com")
    assert await services.revoke_token(uow_factory, revoked)
    for authorization in (
        "Bearer rpcs_not-a-token-anyone-holds",
        f"Bearer {revoked}",
        f"Bearer {world.alice.token}x",
    ):
        response = await client.get("/rpc", headers=upgrade_headers(Authorization=authorization))
        assert response.status == 401, authorization
        assert response.content_type == "application/json"
        body = await response.json()
        assert body["jsonrpc"] == "2.0" and body["id"] is None, body
        assert body["error"]["code"] == UNAUTHENTICATED, body
        assert "upgrade" not in response.headers.get("Connection", "").lower()
    # A client library sees the refused handshake as such.
    try:
        await client.ws_connect("/rpc", headers=bearer("rpcs_not-a-token-anyone-holds"))
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 401
    else:
        raise AssertionError("the upgrade with a bad token was accepted")


async def test_a_peer_that_does_not_answer_the_heartbeat_is_closed(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    heartbeat = 0.3
    client = await app_client(settings=replace(settings, ws_heartbeat=heartbeat))
    deaf_ws = await client.ws_connect("/rpc", headers=bearer(world.alice.token), autoping=False)
    async with LiveClient(deaf_ws) as deaf, live(client, world.alice.token) as answering:
        opened = time.monotonic()
        closed = await deaf.wait_closed(within=heartbeat * 2 + 5)
        assert deaf.pings >= 1  # it was pinged, and did not answer
        assert closed.at - opened <= heartbeat * 2 + SLACK, closed.at - opened
        # The peer that answers its pings (aiohttp's default) stays, past many heartbeats.
        await asyncio.sleep(heartbeat * 3)
        assert answering.closed is None
        assert "items" in await answering.result("purchase.list")


# --- the envelope over a socket -----------------------------------------------------------

# Bodies sent as they are, over HTTP POST and as one text frame; the answers must match.
PROTOCOL_ERRORS = {
    "parse error": "{",
    "nesting too deep": "[" * 100 + "]" * 100,
    "empty batch": "[]",
    "batch of numbers": "[1, 2]",
    "not an object": "7",
    "method not a string": '{"jsonrpc": "2.0", "method": 1, "id": 3}',
    "no jsonrpc member": '{"method": "course.list", "id": 4}',
    "scalar params": '{"jsonrpc": "2.0", "method": "course.list", "params": 3, "id": 5}',
    "unknown method": '{"jsonrpc": "2.0", "method": "no.such.method", "id": "u"}',
    "unknown params": '{"jsonrpc": "2.0", "method": "purchase.get", "params": {"x": 1}, "id": 6}',
    "mixed batch": json.dumps(
        [
            request_object("course.list", id=7),
            notification_object("course.list"),
            {"foo": "bar"},
            request_object("no.such.method", id=8),
            request_object("purchase.get", {"purchase_id": "nope"}, id=9),
        ]
    ),
    "batch too long": json.dumps([request_object("course.list", id=n) for n in range(101)]),
}


def canonical(answer: Any) -> Any:
    """A batch's answers in a fixed order (a batch's items run concurrently)."""
    if isinstance(answer, list):
        return sorted(answer, key=lambda item: json.dumps(item, sort_keys=True))
    return answer


async def test_every_protocol_error_is_answered_over_the_socket_as_over_http(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client, world.alice.token) as socket:
        for name, body in PROTOCOL_ERRORS.items():
            over_http = await send(client, body, token=world.alice.token)
            assert over_http.status == 200, (name, over_http)
            frames_before = len(socket.frames)
            await socket.send(body)
            over_socket = await next_frame(socket, frames_before)
            assert canonical(over_socket) == canonical(over_http.json), name
            assert socket.closed is None, name
    # The cases are what their names say.
    assert_error(over_http.json, INVALID_REQUEST)  # batch too long: one error, no array
    assert (await send(client, PROTOCOL_ERRORS["parse error"])).json["error"]["code"] == PARSE_ERROR
    unknown = (await send(client, PROTOCOL_ERRORS["unknown method"])).json
    assert unknown["error"]["code"] == METHOD_NOT_FOUND


async def test_notifications_get_no_answer_and_still_run(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client, world.alice.token) as socket:
        await socket.send(
            notification_object(
                "purchase.create", {"course": "python-basics", "idempotency_key": "ws-notified"}
            )
        )
        await socket.send(notification_object("no.such.method"))
        await socket.send(notification_object("purchase.get", {"purchase_id": "nope"}))
        await socket.send([notification_object("course.list"), notification_object("no.such")])
        await socket.send("{")  # a parse error is answered (id null), as over HTTP
        sent_ids = []
        # The notified purchase.create ran: alice's list shows it (within a deadline,
        # since messages on a socket run concurrently).
        deadline = time.monotonic() + 5
        while True:
            request = socket.request("purchase.list")
            sent_ids.append(request["id"])
            await socket.send(request)
            page = (await socket.answer(request["id"]))["result"]
            if page["items"]:
                break
            assert time.monotonic() < deadline, "the notified purchase.create never ran"
            await asyncio.sleep(0.02)
        assert len(page["items"]) == 1
        # Nothing answered the notifications: every frame answers one of our ids, but
        # for the parse error.
        await socket.wait_for(lambda: len(socket.null_id_answers) == 1)
        assert [frame["id"] for frame in socket.frames if frame["id"] is not None] == sent_ids
        assert socket.null_id_answers[0]["error"]["code"] == PARSE_ERROR
        assert socket.notifications == []


async def test_a_binary_frame_is_an_invalid_request_and_the_socket_stays_open(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client, world.alice.token) as socket:
        await socket.ws.send_bytes(json.dumps(request_object("course.list", id=1)).encode())
        answer = await next_frame(socket, 0)
        assert_error(answer, INVALID_REQUEST, None)
        assert len(await socket.result("course.list")) == 2
        assert socket.closed is None


async def test_a_frame_over_the_body_limit_closes_the_socket_1009(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    client = await app_client(settings=replace(settings, max_body_bytes=1024))
    async with live(client, world.alice.token) as socket:
        fits = json.dumps(request_object("course.list", {}, id="x" * 900))
        assert len(fits) <= 1024
        await socket.send(fits)
        assert "result" in await socket.answer("x" * 900)
        await socket.send(json.dumps(request_object("course.list", {}, id="y" * 2000)))
        closed = await socket.wait_closed()
        assert closed.code == MESSAGE_TOO_BIG, closed


# --- subscriptions ------------------------------------------------------------------------


async def test_subscribe_gives_ids_and_unsubscribe_ends_only_that_subscription(
    client: TestClient[Any, Any], world: World
) -> None:
    async with live(client, world.alice.token) as socket, live(client, world.alice.token) as other:
        ended = await socket.subscribe()
        kept = await socket.subscribe()
        assert ended != kept
        assert await socket.result("purchase.unsubscribe", {"subscription": ended}) is True
        assert await socket.result("purchase.unsubscribe", {"subscription": ended}) is False
        for unknown in ("0" * 32, "abc"):  # well-formed ids that name no subscription
            assert await socket.result("purchase.unsubscribe", {"subscription": unknown}) is False
        # Another socket of the same user cannot end this socket's subscription.
        assert await other.result("purchase.unsubscribe", {"subscription": kept}) is False

        purchase = await create(client, world.alice.token)
        [update] = await socket.updates_at_least(1, kept)
        assert update["purchase"]["purchase_id"] == purchase["purchase_id"]
        assert socket.updates(ended) == []
        assert [n["params"]["subscription"] for n in socket.notifications] == [kept]


async def test_creation_and_fulfilment_notify_the_owner_and_staff_and_no_other_buyer(
    client: TestClient[Any, Any], world: World
) -> None:
    async with (
        live(client, world.alice.token) as alice,
        live(client, world.bob.token) as bob,
        live(client, world.staff.token) as staff,
        live(client, world.payments.token) as payments,
    ):
        subscriptions = {
            socket: await socket.subscribe() for socket in (alice, bob, staff, payments)
        }

        first = await create(client, world.alice.token)
        [created] = await alice.updates_at_least(1)
        assert set(created) == {"seq", "event", "purchase"}
        assert set(created["event"]) == EVENT_FIELDS
        assert set(created["purchase"]) == PURCHASE_FIELDS
        assert created["purchase"] == first
        [event] = await history(client, first["purchase_id"], world.alice.token)
        assert created["event"] == event
        assert created["seq"] == event["seq"]
        assert (event["from_state"], event["to_state"]) == (None, "pending")

        await fulfil_by_webhook(client, first)
        updates = await alice.updates_at_least(2)
        fulfilled = updates[1]
        assert (
            fulfilled["event"]
            == (await history(client, first["purchase_id"], world.alice.token))[1]
        )
        assert (fulfilled["event"]["to_state"], fulfilled["event"]["source"]) == (
            "fulfilled",
            "webhook",
        )
        assert fulfilled["event"]["payment_ref"] == "pi_live"
        now = await result(client, "purchase.get", [first["purchase_id"]], token=world.alice.token)
        assert fulfilled["purchase"] == now
        assert now["state"] == "fulfilled"

        second = await create(client, world.alice.token, "sql-fundamentals")
        await fulfil_as_payments(client, world, second["purchase_id"])
        updates = await alice.updates_at_least(4)
        assert len(updates) == 4
        seqs = [update["seq"] for update in updates]
        assert seqs == sorted(set(seqs)), seqs
        assert [u["event"]["to_state"] for u in updates] == [
            "pending",
            "fulfilled",
            "pending",
            "fulfilled",
        ]
        assert updates[3]["event"]["evidence"] == "payments_scope"
        assert all(u["seq"] == u["event"]["seq"] for u in updates)

        # The envelope of a notification: no id, the subscription it belongs to.
        for notification in alice.notifications:
            assert set(notification) == {"jsonrpc", "method", "params"}, notification
            assert notification["jsonrpc"] == "2.0"
            assert notification["method"] == "purchase.updated"
            assert set(notification["params"]) == {"subscription", "result"}
            assert notification["params"]["subscription"] == subscriptions[alice]

        # bob buys too; his update is the first he gets: nothing of alice's came before.
        bobs = await create(client, world.bob.token)
        [bobs_update] = await bob.updates_at_least(1)
        assert bobs_update["purchase"]["purchase_id"] == bobs["purchase_id"]
        assert bob.updates() == [bobs_update]

        # Staff and the payment backend see all five events, in order, each as
        # purchase.events shows it to them.
        for socket, token in ((staff, world.staff.token), (payments, world.payments.token)):
            seen = await socket.updates_at_least(5)
            assert len(seen) == 5
            assert [u["seq"] for u in seen] == [*seqs, bobs_update["seq"]]
            for update in seen:
                trail = await history(client, update["event"]["purchase_id"], token)
                assert update["event"] in trail
        alices_creation = (await staff.updates_at_least(5))[0]["event"]
        assert alices_creation["actor_email"] == world.alice.email


async def test_a_purchase_id_subscription_sees_only_that_purchase(
    client: TestClient[Any, Any], world: World
) -> None:
    watched = await create(client, world.alice.token)
    unwatched = await create(client, world.alice.token, "sql-fundamentals")
    async with live(client, world.alice.token) as alice, live(client, world.staff.token) as staff:
        mine = await alice.subscribe(purchase_id=watched["purchase_id"])
        staffs = await staff.subscribe(purchase_id=unwatched["purchase_id"])
        await fulfil_as_payments(client, world, unwatched["purchase_id"])
        failed = {"purchase_id": watched["purchase_id"], "purchase_state": "failed",
                  "error_msg": "Card declined"}  # fmt: skip
        await result(client, "purchase.fulfill", failed, token=world.alice.token)
        other = await create(client, world.alice.token)
        canceled = {"purchase_id": other["purchase_id"], "purchase_state": "canceled"}
        await result(client, "purchase.fulfill", canceled, token=world.alice.token)
        await fulfil_as_payments(client, world, watched["purchase_id"])
        # The watched purchase's two changes, and nothing of the three between them.
        updates = await alice.updates_at_least(2, mine)
        assert [u["purchase"]["purchase_id"] for u in updates] == [watched["purchase_id"]] * 2
        assert [u["event"]["to_state"] for u in updates] == ["failed", "fulfilled"]
        assert alice.updates() == updates
        [seen] = await staff.updates_at_least(1, staffs)
        assert seen["purchase"]["purchase_id"] == unwatched["purchase_id"]
        assert seen["seq"] < updates[0]["seq"]
        # The unwatched purchase's later change would come before this one of the
        # watched: staff's filter lets only the unwatched one through.
        await fulfil_as_payments(client, world, unwatched["purchase_id"])  # a repeat: no event
        assert len(staff.updates()) == 1


async def test_subscribing_to_a_purchase_one_cannot_see_is_404(
    client: TestClient[Any, Any], world: World
) -> None:
    alices = await create(client, world.alice.token)
    async with live(client, world.bob.token) as bob, live(client, world.staff.token) as staff:
        for purchase_id in (alices["purchase_id"], "nosuchpurchase"):
            answer = await bob.call("purchase.subscribe", {"purchase_id": purchase_id})
            assert_error(answer, NOT_FOUND, answer["id"])
        assert isinstance(await staff.subscribe(purchase_id=alices["purchase_id"]), str)
        # A refused subscribe is no subscription: bob gets nothing of alice's.
        await fulfil_as_payments(client, world, alices["purchase_id"])
        await staff.updates_at_least(1)
        bobs = await create(client, world.bob.token)
        assert bob.notifications == []
        await bob.subscribe()
        await create(client, world.bob.token, "sql-fundamentals")
        [update] = await bob.updates_at_least(1)
        assert update["purchase"]["purchase_id"] != bobs["purchase_id"]


async def test_without_since_only_events_committed_after_the_subscribe_arrive(
    client: TestClient[Any, Any], world: World
) -> None:
    # A change committed just before the subscribe (its answer received) is not sent,
    # however soon the subscribe follows: the first update is the change made after it.
    async with live(client, world.alice.token) as socket:
        for attempt in range(10):
            before = await create(client, world.alice.token)
            subscription = await socket.subscribe()
            after = await create(client, world.alice.token, "sql-fundamentals")
            [first, *_] = await socket.updates_at_least(1, subscription)
            assert first["purchase"]["purchase_id"] == after["purchase_id"], (
                f"attempt {attempt}: the update of {before['purchase_id']}, committed before "
                "the subscribe, was sent"
            )


async def test_since_replays_the_missed_events_once_in_order_then_goes_live(
    client: TestClient[Any, Any], world: World
) -> None:
    first = await create(client, world.alice.token)
    [created] = await history(client, first["purchase_id"], world.alice.token)
    await create(client, world.bob.token)  # not alice's: never replayed to her
    await fulfil_as_payments(client, world, first["purchase_id"])
    second = await create(client, world.alice.token, "sql-fundamentals")
    missed = [
        (await history(client, first["purchase_id"], world.alice.token))[1],
        (await history(client, second["purchase_id"], world.alice.token))[0],
    ]

    async with (
        live(client, world.alice.token) as alice,
        live(client, world.alice.token) as all_of_it,
    ):
        subscription = await alice.subscribe(since=created["seq"])
        replayed = await alice.updates_at_least(2, subscription)
        assert [u["event"] for u in replayed] == missed
        # The purchase of each is as it is now.
        assert replayed[0]["purchase"] == await result(
            client, "purchase.get", [first["purchase_id"]], token=world.alice.token
        )

        third = await create(client, world.alice.token, "sql-fundamentals")
        updates = await alice.updates_at_least(3, subscription)
        assert len(updates) == 3
        assert updates[2]["purchase"]["purchase_id"] == third["purchase_id"]
        assert [u["seq"] for u in updates] == [*[e["seq"] for e in missed], updates[2]["seq"]]
        assert updates[2]["seq"] > missed[-1]["seq"]

        # since 0: the whole history in scope (alice's four events), then nothing twice.
        everything = await all_of_it.subscribe(since=0)
        seen = await all_of_it.updates_at_least(4, everything)
        assert [u["seq"] for u in seen] == [created["seq"], *[u["seq"] for u in updates]]
        fourth = await create(client, world.alice.token, "sql-fundamentals")
        seen = await all_of_it.updates_at_least(5, everything)
        assert len(seen) == 5 and seen[4]["purchase"]["purchase_id"] == fourth["purchase_id"]
        assert len({u["seq"] for u in seen}) == 5


async def test_since_ahead_of_the_latest_event_or_not_a_seq_is_invalid_params(
    client: TestClient[Any, Any], world: World
) -> None:
    await create(client, world.alice.token)
    latest = await latest_seq(client, world)
    async with live(client, world.alice.token) as socket:
        for since in (latest + 1, latest + 1000, -1):
            answer = await socket.call("purchase.subscribe", {"since": since})
            assert_error(answer, INVALID_PARAMS, answer["id"])
        # The latest itself is fine: nothing to replay, then live.
        subscription = await socket.subscribe(since=latest)
        purchase = await create(client, world.alice.token, "sql-fundamentals")
        [update] = await socket.updates_at_least(1, subscription)
        assert update["purchase"]["purchase_id"] == purchase["purchase_id"]
        assert update["seq"] == latest + 1


async def test_since_older_than_the_replay_window_gets_one_resync_then_live_updates(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    window = 3
    client = await app_client(settings=replace(settings, ws_replay_window=window))
    for _ in range(6):
        await create(client, world.alice.token)
    latest = await latest_seq(client, world)
    async with live(client, world.alice.token) as socket, live(client, world.alice.token) as near:
        subscription = await socket.subscribe(since=0)
        await socket.wait_for(lambda: len(socket.notifications) >= 1)
        [resync] = socket.notifications
        assert resync["method"] == "purchase.resync"
        assert set(resync["params"]) == {"subscription", "result"}
        assert resync["params"]["subscription"] == subscription
        resynced_at = resync["params"]["result"]["seq"]
        # The latest event the app had read when the subscription began: the newest of
        # all here, unless its feed had not yet read the last commit (then a little
        # before it, and the rest follow as updates).
        assert window < resynced_at <= latest
        assert isinstance(resync["params"]["result"]["reason"], str)

        # Within the window: replayed as usual, no resync.
        replaying = await near.subscribe(since=latest - 2)
        replayed = await near.updates_at_least(2, replaying)
        assert [u["seq"] for u in replayed] == [latest - 1, latest]

        after = await create(client, world.alice.token)
        updates = await socket.updates_at_least(latest + 1 - resynced_at, subscription)
        assert [u["seq"] for u in updates] == list(range(resynced_at + 1, latest + 2))
        assert updates[-1]["purchase"]["purchase_id"] == after["purchase_id"]
        assert [n["method"] for n in socket.notifications] == [
            "purchase.resync",
            *["purchase.updated"] * len(updates),
        ]
        await near.updates_at_least(3, replaying)
        assert [n["method"] for n in near.notifications] == ["purchase.updated"] * 3


async def subscribe_batch(socket: LiveClient, count: int) -> list[dict[str, Any]]:
    batch = [socket.request("purchase.subscribe", {}) for _ in range(count)]
    await socket.send(batch)
    return [await socket.answer(request["id"]) for request in batch]


async def test_a_batch_of_cap_plus_one_subscribes_gets_cap_ids_and_one_409(
    client: TestClient[Any, Any], world: World
) -> None:
    cap = Settings().ws_max_subscriptions
    assert cap == 16
    async with live(client, world.alice.token) as socket:
        answers = await subscribe_batch(socket, cap + 1)
        ids = [a["result"] for a in answers if "result" in a]
        refused = [a for a in answers if "error" in a]
        assert len(ids) == cap and len(set(ids)) == cap
        [conflict] = refused
        assert_error(conflict, CONFLICT, conflict["id"])
        # Full: one more is refused, until one ends.
        answer = await socket.call("purchase.subscribe", {})
        assert_error(answer, CONFLICT, answer["id"])
        assert await socket.result("purchase.unsubscribe", {"subscription": ids[0]}) is True
        assert isinstance(await socket.subscribe(), str)


async def test_the_subscription_cap_is_a_setting(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    client = await app_client(settings=replace(settings, ws_max_subscriptions=2))
    async with live(client, world.alice.token) as socket, live(client, world.alice.token) as other:
        answers = await subscribe_batch(socket, 3)
        assert sum("result" in a for a in answers) == 2
        assert [a["error"]["code"] for a in answers if "error" in a] == [CONFLICT]
        # Per socket: another socket of the same user has its own.
        assert len([a for a in await subscribe_batch(other, 2) if "result" in a]) == 2


async def test_no_notification_of_a_subscription_comes_before_its_subscribe_answer(
    client: TestClient[Any, Any], world: World
) -> None:
    for _ in range(5):
        await create(client, world.alice.token)
    stop = asyncio.Event()

    async def keep_changing() -> int:
        made = 0
        while not stop.is_set():
            await create(client, world.alice.token, ("python-basics", "sql-fundamentals")[made % 2])
            made += 1
        return made

    async with live(client, world.alice.token) as socket:
        # Replayed history is waiting at once for the subscribe with since=0.
        replaying = socket.request("purchase.subscribe", {"since": 0})
        await socket.send(replaying)
        producer = asyncio.create_task(keep_changing())
        # Live ones are flowing while the others are subscribed, several in flight at once.
        live_requests = [socket.request("purchase.subscribe", {}) for _ in range(8)]
        for request in live_requests:
            await socket.send(request)
            await asyncio.sleep(0.005)
        subscriptions = {
            request["id"]: (await socket.answer(request["id"]))["result"]
            for request in [replaying, *live_requests]
        }
        for subscription in subscriptions.values():
            await socket.updates_at_least(1, subscription, within=10)
        stop.set()
        assert await producer > 0
        for id, subscription in subscriptions.items():
            first = first_notification_index(socket, subscription)
            assert first is not None
            assert answer_index(socket, id) < first, (id, subscription)


async def test_the_websocket_only_methods_over_http_post_are_method_not_found(
    client: TestClient[Any, Any], world: World
) -> None:
    for method, params in (
        ("purchase.subscribe", {}),
        ("purchase.subscribe", {"since": 0}),
        ("purchase.unsubscribe", {"subscription": "x"}),
        ("rpc.authenticate", {"token": world.alice.token}),
    ):
        for token in (world.alice.token, None):
            reply = await send(client, request_object(method, params, id=3), token=token)
            assert reply.status == 200, reply
            error = assert_error(reply.json, METHOD_NOT_FOUND, 3)
            assert "websocket" in json.dumps(error.get("data")).lower(), error


async def test_a_revoked_token_closes_its_socket_1008_within_the_recheck_interval(
    app_client: AppClientFactory,
    settings: Settings,
    world: World,
    uow_factory: SqlUnitOfWorkFactory,
) -> None:
    recheck = 0.5
    client = await app_client(settings=replace(settings, ws_token_recheck=recheck))
    async with (
        live(client, world.alice.token) as by_header,
        live(client) as by_message,
        live(client, world.bob.token) as bob,
    ):
        await by_message.result("rpc.authenticate", {"token": world.alice.token})
        for socket in (by_header, by_message, bob):
            await socket.subscribe()
        assert await services.revoke_token(uow_factory, world.alice.token)
        revoked_at = time.monotonic()
        for socket in (by_header, by_message):
            closed = await socket.wait_closed(within=recheck + 10)
            assert closed.code == POLICY_VIOLATION, closed
            assert closed.reason.startswith("token"), closed
            assert closed.at - revoked_at <= recheck + SLACK, closed.at - revoked_at
        # bob's token is live: his socket and subscription go on.
        await create(client, world.bob.token)
        await bob.updates_at_least(1)
        assert bob.closed is None


async def test_upgrades_past_the_connection_cap_are_refused_503(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    cap = 2
    client = await app_client(settings=replace(settings, ws_max_connections=cap))
    async with live(client, world.alice.token) as first, live(client) as second:
        for headers in (
            upgrade_headers(),
            upgrade_headers(Authorization=f"Bearer {world.bob.token}"),
        ):
            response = await client.get("/rpc", headers=headers)
            assert response.status == 503
            assert response.content_type == "application/json"
            body = await response.json()
            assert body["jsonrpc"] == "2.0" and body["id"] is None, body
            assert isinstance(body["error"]["code"], int) and body["error"]["message"], body
        # HTTP POST is not held back by the sockets' cap.
        assert len(await result(client, "course.list", token=world.alice.token)) == 2
        assert len(await second.result("course.list")) == 2
        await first.close()
        # Below the cap again (the server counts the close a moment after it).
        deadline = time.monotonic() + 5
        while True:
            try:
                ws = await client.ws_connect("/rpc", headers=bearer(world.bob.token))
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503, exc
                assert time.monotonic() < deadline, "the cap was never freed"
                await asyncio.sleep(0.02)
                continue
            break
        async with LiveClient(ws) as third:
            assert "items" in await third.result("purchase.list")
    # Sockets closed by their peer give their place back: open and close more than the
    # cap, one after another.
    for _ in range(2 * cap):
        async with live(client, world.alice.token) as socket:
            assert "items" in await socket.result("purchase.list")
