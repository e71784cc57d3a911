"""Prometheus metrics at ``GET /metrics`` (issue 19), read over real HTTP on SQLite and
PostgreSQL and parsed with prometheus-client's own parser (never by matching the text).

- Exact counts: each call once by method and outcome (each batch item one call,
  notifications too, a rate-limited call as 429), each body once by transport, the batch
  sizes, every refusal before a method ran by reason, authentication failures once per
  request, purchase transitions, refused payment proofs and webhook events, the receipt
  outbox (pending, its age, delivery attempts), WebSocket connections and subscriptions
  going up and back down, the database pool.
- Bounded labels: a thousand made-up method names add one ``_OTHER`` series, nothing more.
- Protection: loopback without a database_proxy header, or the metrics token; otherwise 403;
  ``metrics=False`` has no ``/metrics`` at all.
- A scrape while the database is away still answers, saying so (PostgreSQL: the database
  is reached through a database_proxy the test cuts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy.engine import make_url

from rpc_server.config import Settings
from rpc_server.methods import REGISTRY
from tests.conftest import World
from tests.e2e.conftest import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    AppClientFactory,
    CreatePurchase,
    Fulfil,
    PostRaw,
    notification_object,
    request_object,
    send,
)
from tests.live_client import LiveClient, bearer
from tests.payments import OTHER_PAYMENT_KEY, proof_for, webhook_request
from tests.tcp_proxy import TcpProxy

UNAUTHENTICATED = "401"
NOT_FOUND = "404"
RATE_LIMITED = "429"
PAYMENT_NOT_VERIFIED = "402"
OTHER = "_OTHER"
# What a call may end as (README, "Errors"): ok, or an error code a method answers with.
CALL_OUTCOMES = {
    "ok", "-32601", "-32602", "-32603", "-32000", "-32001", "401", "402", "404", "409", "429",
}  # fmt: skip
METRICS_TOKEN = "a-metrics-token-long-enough"
# How long a test waits for something the server does after answering (a socket's end,
# a receipt's delivery), polling, never sleeping a fixed time.
WAIT_SECONDS = 10.0

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Exposition:
    """One scrape, parsed: every sample by name, then by its label set."""

    samples: dict[str, dict[Labels, float]]
    content_type: str

    @classmethod
    def parse(cls, text: str, content_type: str) -> Exposition:
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                by_labels = samples.setdefault(sample.name, {})
                key = labels_of(sample)
                assert key not in by_labels, f"{sample.name}{dict(key)} twice"
                by_labels[key] = sample.value
        return cls(samples, content_type)

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def value(self, name: str, **labels: str) -> float:
        """The value of the sample of exactly these labels (failing if there is none)."""
        series = self.series(name)
        key = tuple(sorted(labels.items()))
        assert key in series, f"no {name}{labels} in {sorted(series)}"
        return series[key]

    def value_or_0(self, name: str, **labels: str) -> float:
        """The value of the sample of these labels, or 0 while there is none."""
        return self.series(name).get(tuple(sorted(labels.items())), 0.0)

    def calls(self) -> dict[tuple[str, str], float]:
        """``rpc_server_calls_total`` as {(method, outcome): count}."""
        return {
            (dict(key)["method"], dict(key)["outcome"]): value
            for key, value in self.series("rpc_server_calls_total").items()
        }

    def durations(self) -> dict[tuple[str, str], float]:
        """``rpc_server_call_duration_seconds_count`` as {(method, outcome): count}, after
        checking each series' buckets (cumulative, ending in +Inf at the count)."""
        counts: dict[tuple[str, str], float] = {}
        for key, count in self.series("rpc_server_call_duration_seconds_count").items():
            labels = dict(key)
            method, outcome = labels["method"], labels["outcome"]
            counts[(method, outcome)] = count
            buckets = sorted(
                (float(dict(bucket)["le"]), value)
                for bucket, value in self.series("rpc_server_call_duration_seconds_bucket").items()
                if dict(bucket)["method"] == method and dict(bucket)["outcome"] == outcome
            )
            values = [value for _le, value in buckets]
            assert values == sorted(values), (method, outcome, buckets)
            assert buckets[-1] == (float("inf"), count), (method, outcome, buckets)
        return counts


def labels_of(sample: Sample) -> Labels:
    return tuple(sorted(sample.labels.items()))


Scrape = Callable[..., Awaitable[Exposition]]


async def scrape_of(
    client: TestClient[Any, Any], headers: dict[str, str] | None = None
) -> Exposition:
    response = await client.get("/metrics", headers=headers or {})
    text = await response.text()
    assert response.status == 200, text
    return Exposition.parse(text, response.headers["Content-Type"])


@pytest.fixture
def scrape(client: TestClient[Any, Any]) -> Scrape:
    """``await scrape()``: GET /metrics of the ``client`` app, parsed."""

    async def read(headers: dict[str, str] | None = None) -> Exposition:
        return await scrape_of(client, headers)

    return read


async def eventually(
    scrape: Callable[[], Awaitable[Exposition]], holds: Callable[[Exposition], bool], what: str
) -> Exposition:
    """Scrape until ``holds`` is true of a scrape (failing after WAIT_SECONDS)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        exposition = await scrape()
        if holds(exposition):
            return exposition
        assert time.monotonic() < deadline, f"{what}: not so after {WAIT_SECONDS}s"
        await asyncio.sleep(0.02)


def by_id(reply_json: Any) -> dict[Any, dict[str, Any]]:
    return {answer["id"]: answer for answer in reply_json}


# --- calls, bodies, refusals, authentication ---------------------------------------------


async def test_each_call_is_counted_once_by_method_and_outcome(
    post: PostRaw, scrape: Scrape, world: World
) -> None:
    token = world.alice.token
    assert (await post(request_object("course.list"))).status == 200
    batch = [
        request_object("course.list", id=1),
        request_object("purchase.get", {"nope": 1}, id=2),
        request_object("purchase.get", ["0" * 32], id=3),
    ]
    answers = by_id((await post(batch, token=token)).json)
    assert "result" in answers[1]
    assert answers[2]["error"]["code"] == INVALID_PARAMS
    assert answers[3]["error"]["code"] == int(NOT_FOUND)
    unauthenticated = await post(request_object("purchase.get", ["0" * 32]))
    assert unauthenticated.json["error"]["code"] == int(UNAUTHENTICATED)
    unknown = await post(request_object("no.such.method"))
    assert unknown.json["error"]["code"] == METHOD_NOT_FOUND
    # Notifications: never answered, still counted with the outcome they had.
    for notification in (
        notification_object("course.list"),
        notification_object("purchase.get", ["0" * 32]),
    ):
        reply = await post(notification)
        assert reply.status == 204, reply

    metrics = await scrape()
    expected = {
        ("course.list", "ok"): 3,
        ("purchase.get", str(INVALID_PARAMS)): 1,
        ("purchase.get", NOT_FOUND): 1,
        ("purchase.get", UNAUTHENTICATED): 2,
        (OTHER, str(METHOD_NOT_FOUND)): 1,
    }
    assert metrics.calls() == expected
    assert metrics.durations() == expected
    assert metrics.value("rpc_server_requests_total", transport="http") == 6
    assert metrics.value("rpc_server_requests_total", transport="websocket") == 0
    # One batch was run, of 3.
    assert metrics.value("rpc_server_batch_size_count") == 1
    assert metrics.value("rpc_server_batch_size_sum") == 3
    assert metrics.value("rpc_server_batch_size_bucket", le="2.0") == 0
    assert metrics.value("rpc_server_batch_size_bucket", le="5.0") == 1
    # Nothing was refused before a method ran; the zeros are there from the start.
    refused = metrics.series("rpc_server_requests_refused_total")
    assert {dict(key)["reason"]: value for key, value in refused.items()} == {
        "body_too_large": 0,
        "parse_error": 0,
        "empty_batch": 0,
        "batch_too_long": 0,
        "invalid_request": 0,
        # Counted by the connection guard of a served process (the test client has none):
        # tests/integration/test_connection_refusal_metrics.py.
        "too_many_connections": 0,
        "read_timeout": 0,
    }
    assert metrics.value("rpc_server_rate_limited_calls_total") == 0


async def test_a_scrape_counts_nothing_but_what_came_to_rpc(post: PostRaw, scrape: Scrape) -> None:
    first = await scrape()
    assert first.calls() == {}
    assert first.value("rpc_server_requests_total", transport="http") == 0
    await post(request_object("course.list"))
    for _ in range(3):
        again = await scrape()
        assert again.calls() == {("course.list", "ok"): 1}
        assert again.value("rpc_server_requests_total", transport="http") == 1


async def test_rate_limited_calls_are_counted_as_429_and_not_run(
    app_client: AppClientFactory, settings: Settings
) -> None:
    limited = dataclasses.replace(
        settings, rate_limit=0.5, rate_burst=5, anonymous_rate_limit=0.5, anonymous_rate_burst=3
    )
    client = await app_client(settings=limited)
    batch = [request_object("course.list", id=i) for i in range(4)]
    batch.append(notification_object("course.list"))  # over the limit too: dropped, counted
    answers = by_id((await send(client, batch)).json)
    assert [("error" in answers[i]) for i in range(4)] == [False, False, False, True]
    metrics = await scrape_of(client)
    assert metrics.calls() == {("course.list", "ok"): 3, ("course.list", RATE_LIMITED): 2}
    assert metrics.value("rpc_server_rate_limited_calls_total") == 2
    assert metrics.value("rpc_server_batch_size_count") == 1
    assert metrics.value("rpc_server_batch_size_sum") == 5


async def test_refusals_before_any_method_are_counted_by_reason(
    app_client: AppClientFactory, settings: Settings
) -> None:
    client = await app_client(
        settings=dataclasses.replace(settings, max_body_bytes=4096, max_batch_length=5)
    )
    too_large = await send(client, json.dumps(request_object("course.list", "x" * 5000)))
    assert too_large.status == 413
    assert (await send(client, b'{"jsonrpc": "2.0",')).json["error"]["code"] == -32700
    assert (await send(client, [])).json["error"]["code"] == -32600
    too_long = [request_object("course.list", id=i) for i in range(6)]
    assert (await send(client, too_long)).json["error"]["code"] == -32600
    # Two invalid request objects in a batch beside a valid one: two refusals, one call.
    mixed = [1, {"jsonrpc": "2.0", "id": 7}, request_object("course.list", id=8)]
    answers = (await send(client, mixed)).json
    assert sorted(a.get("error", {}).get("code", 0) for a in answers) == [-32600, -32600, 0]
    assert (await send(client, {"jsonrpc": "1.0", "method": "x", "id": 1})).status == 200

    metrics = await scrape_of(client)
    refused = metrics.series("rpc_server_requests_refused_total")
    assert {dict(key)["reason"]: value for key, value in refused.items()} == {
        "body_too_large": 1,
        "parse_error": 1,
        "empty_batch": 1,
        "batch_too_long": 1,
        "invalid_request": 3,
        "too_many_connections": 0,
        "read_timeout": 0,
    }
    assert metrics.value("rpc_server_requests_total", transport="http") == 6
    # Only the mixed batch was run (the empty and the too long one were refused whole).
    assert metrics.value("rpc_server_batch_size_count") == 1
    assert metrics.value("rpc_server_batch_size_sum") == 3
    assert metrics.calls() == {("course.list", "ok"): 1}


async def test_authentication_failures_once_per_request_by_reason(
    client: TestClient[Any, Any], post: PostRaw, scrape: Scrape, world: World
) -> None:
    batch = [request_object("purchase.list", id=i) for i in range(3)]
    answers = (await post(batch, token="not-a-token-of-anyone")).json
    assert [a["error"]["code"] for a in answers] == [int(UNAUTHENTICATED)] * 3
    # The same unknown token again (now known unknown to this process): one more failure.
    again = await post(request_object("purchase.list"), token="not-a-token-of-anyone")
    assert again.json["error"]["code"] == int(UNAUTHENTICATED)
    # Two Authorization headers: ambiguous, whichever is valid.
    response = await client.post(
        "/rpc",
        data=json.dumps(request_object("course.list")),
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {world.alice.token}"),
            ("Authorization", f"Bearer {world.bob.token}"),
        ],
    )
    assert (await response.json())["error"]["code"] == int(UNAUTHENTICATED)
    # A valid token is no failure.
    assert "result" in (await post(request_object("purchase.list"), token=world.bob.token)).json

    metrics = await scrape()
    failures = metrics.series("rpc_server_authentication_failures_total")
    assert {dict(key)["reason"]: value for key, value in failures.items()} == {
        "invalid_token": 2,
        "ambiguous_credentials": 1,
    }
    assert metrics.calls() == {
        ("purchase.list", UNAUTHENTICATED): 4,
        ("course.list", UNAUTHENTICATED): 1,
        ("purchase.list", "ok"): 1,
    }


# --- the domain: purchases, payments, receipts ---------------------------------------------


async def test_transitions_and_refused_payments_are_counted(
    client: TestClient[Any, Any],
    post: PostRaw,
    scrape: Scrape,
    world: World,
    create_purchase: CreatePurchase,
    fulfil: Fulfil,
) -> None:
    paid = await create_purchase()
    refused = await create_purchase("sql-fundamentals")
    await fulfil(paid)
    # A proof signed with a key the server does not hold.
    bad_proof = {
        "purchase_id": refused["purchase_id"],
        "purchase_state": "fulfilled",
        "payment_proof": proof_for(refused, key=OTHER_PAYMENT_KEY),
    }
    answer = await post(request_object("purchase.fulfill", bad_proof), token=world.alice.token)
    assert answer.json["error"]["code"] == int(PAYMENT_NOT_VERIFIED)
    assert answer.json["error"]["data"] == {"reason": "invalid_signature"}
    # The same wrong signature as a webhook delivery.
    headers, body = webhook_request(proof_for(refused, key=OTHER_PAYMENT_KEY))
    response = await client.post("/webhooks/payments", data=body, headers=headers)
    assert response.status == 401, await response.text()
    # A proof for the other purchase: mismatch.
    mismatched = dict(bad_proof, payment_proof=proof_for(paid))
    answer = await post(request_object("purchase.fulfill", mismatched), token=world.alice.token)
    assert answer.json["error"]["data"] == {"reason": "mismatch"}

    metrics = await scrape()
    transitions = metrics.series("rpc_server_purchase_transitions_total")
    assert {
        (dict(key)["from_state"], dict(key)["to_state"]): value
        for key, value in transitions.items()
    } == {("none", "pending"): 2, ("pending", "fulfilled"): 1}
    payments = metrics.series("rpc_server_payment_events_refused_total")
    assert {
        (dict(key)["source"], dict(key)["reason"]): value for key, value in payments.items()
    } == {
        ("proof", "invalid_signature"): 1,
        ("proof", "mismatch"): 1,
        ("webhook", "invalid_signature"): 1,
    }
    assert metrics.calls() == {
        ("purchase.create", "ok"): 2,
        ("purchase.fulfill", "ok"): 1,
        ("purchase.fulfill", PAYMENT_NOT_VERIFIED): 2,
    }


async def test_a_queued_receipt_is_pending_and_ages_while_nothing_delivers(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, mail_in_serve=False))
    payments = world.payments.token
    empty = await scrape_of(client)
    assert empty.value("rpc_server_receipt_backlog_up") == 1
    assert empty.value("rpc_server_receipts", status="pending") == 0
    assert empty.value("rpc_server_receipts", status="dead") == 0
    assert empty.value("rpc_server_receipt_oldest_pending_age_seconds") == 0
    create = request_object("purchase.create", {"course": "python-basics"})
    purchase = (await send(client, create, token=world.alice.token)).json["result"]
    fulfil = {"purchase_id": purchase["purchase_id"], "purchase_state": "fulfilled"}
    fulfilled = await send(client, request_object("purchase.fulfill", fulfil), token=payments)
    assert "result" in fulfilled.json

    queued = await eventually(
        lambda: scrape_of(client),
        lambda m: m.value("rpc_server_receipt_oldest_pending_age_seconds") > 0,
        "the pending receipt's age",
    )
    assert queued.value("rpc_server_receipts", status="pending") == 1
    assert queued.value("rpc_server_receipts", status="dead") == 0
    assert queued.value("rpc_server_receipt_oldest_pending_age_seconds") < 60
    assert queued.series("rpc_server_receipt_delivery_attempts_total") == {}
    later = await eventually(
        lambda: scrape_of(client),
        lambda m: (
            m.value("rpc_server_receipt_oldest_pending_age_seconds")
            > queued.value("rpc_server_receipt_oldest_pending_age_seconds")
        ),
        "the pending receipt getting older",
    )
    assert later.value("rpc_server_receipts", status="pending") == 1


async def test_a_delivered_receipt_is_counted_sent_and_leaves_the_backlog(
    client: TestClient[Any, Any],
    scrape: Scrape,
    create_purchase: CreatePurchase,
    fulfil: Fulfil,
) -> None:
    await fulfil(await create_purchase())
    delivered = await eventually(
        scrape,
        lambda m: m.value_or_0("rpc_server_receipt_delivery_attempts_total", outcome="sent") >= 1,
        "a receipt sent",
    )
    attempts = delivered.series("rpc_server_receipt_delivery_attempts_total")
    assert {dict(key)["outcome"]: value for key, value in attempts.items()} == {"sent": 1}
    after = await eventually(
        scrape,
        lambda m: m.value("rpc_server_receipts", status="pending") == 0,
        "the backlog emptied",
    )
    assert after.value("rpc_server_receipt_oldest_pending_age_seconds") == 0


# --- WebSockets and the pool -------------------------------------------------------------


async def test_websocket_connections_and_subscriptions_go_up_and_back_down(
    client: TestClient[Any, Any], scrape: Scrape, world: World
) -> None:
    idle = await scrape()
    assert idle.value("rpc_server_websocket_connections") == 0
    assert idle.value("rpc_server_websocket_subscriptions") == 0
    ws = await client.ws_connect("/rpc", headers=bearer(world.alice.token))
    async with LiveClient(ws) as live:
        subscription = await live.subscribe()
        open_ = await scrape()
        assert open_.value("rpc_server_websocket_connections") == 1
        assert open_.value("rpc_server_websocket_subscriptions") == 1
        assert await live.result("purchase.unsubscribe", {"subscription": subscription}) is True
        unsubscribed = await scrape()
        assert unsubscribed.value("rpc_server_websocket_connections") == 1
        assert unsubscribed.value("rpc_server_websocket_subscriptions") == 0
        await live.subscribe()  # left open: the socket's end ends it
        await live.send(notification_object("course.list"))
        assert (await live.call("course.list"))["result"] is not None
        assert (await scrape()).value("rpc_server_websocket_subscriptions") == 1
    closed = await eventually(
        scrape,
        lambda m: m.value("rpc_server_websocket_connections") == 0,
        "the socket's end counted",
    )
    assert closed.value("rpc_server_websocket_subscriptions") == 0
    # Five frames (subscribe, unsubscribe, subscribe, a notification, a call); no POST.
    assert closed.value("rpc_server_requests_total", transport="websocket") == 5
    assert closed.value("rpc_server_requests_total", transport="http") == 0
    assert closed.calls() == {
        ("purchase.subscribe", "ok"): 2,
        ("purchase.unsubscribe", "ok"): 1,
        ("course.list", "ok"): 2,
    }


async def test_pool_waits_grow_with_calls_and_nothing_is_held_when_idle(
    app_client: AppClientFactory, settings: Settings, world: World
) -> None:
    # No deliverer: nothing but the calls and the scrapes takes a connection.
    client = await app_client(settings=dataclasses.replace(settings, mail_in_serve=False))
    before = await scrape_of(client)
    waits_before = before.value("rpc_server_db_pool_wait_seconds_count")
    create = request_object("purchase.create", {"course": "python-basics"})
    for _ in range(5):
        answer = await send(client, create, token=world.alice.token)
        assert "result" in answer.json
    after = await scrape_of(client)
    # Each call that writes takes at least one pooled connection (SQLite's reads share
    # theirs, which the pool's metrics leave out).
    assert after.value("rpc_server_db_pool_wait_seconds_count") >= waits_before + 5
    assert after.value("rpc_server_db_pool_wait_seconds_bucket", le="+Inf") == after.value(
        "rpc_server_db_pool_wait_seconds_count"
    )
    assert 0 <= after.value("rpc_server_db_pool_wait_seconds_sum") < 5
    assert after.value("rpc_server_db_connections_in_use") == 0


# --- bounded labels ----------------------------------------------------------------------


async def test_a_thousand_unknown_method_names_add_one_other_series(
    post: PostRaw, scrape: Scrape, settings: Settings
) -> None:
    assert (await post(request_object("course.list"))).status == 200
    before = await scrape()
    names = [f"made.up.{n}" for n in range(1000)]
    max_batch = settings.max_batch_length
    for start in range(0, len(names), max_batch):
        chunk = names[start : start + max_batch]
        batch = [request_object(name, id=i) for i, name in enumerate(chunk)]
        answers = (await post(batch)).json
        assert [a["error"]["code"] for a in answers] == [METHOD_NOT_FOUND] * len(chunk)
    after = await scrape()
    assert after.calls() == {**before.calls(), (OTHER, str(METHOD_NOT_FOUND)): 1000}
    assert set(after.durations()) == set(after.calls())
    for name in names[:3]:
        assert not any(name in dict(key).values() for key in after.series("rpc_server_calls_total"))
    # The exposition as a whole grew by the one series' samples only.
    grown = {
        name: len(after.series(name)) - len(before.series(name))
        for name in after.samples
        if len(after.series(name)) != len(before.series(name))
    }
    buckets = len(after.series("rpc_server_call_duration_seconds_bucket")) // len(after.calls())
    assert grown == {
        "rpc_server_calls_total": 1,
        "rpc_server_call_duration_seconds_count": 1,
        "rpc_server_call_duration_seconds_sum": 1,
        "rpc_server_call_duration_seconds_bucket": buckets,
    }
    # Whatever is sent, a call's label set is a registered method (or _OTHER) and an
    # outcome this server answers with.
    methods = {*REGISTRY.methods, OTHER}
    assert {method for method, _outcome in after.calls()} <= methods
    assert {outcome for _method, outcome in after.calls()} <= CALL_OUTCOMES
    assert len(after.calls()) <= len(methods) * len(CALL_OUTCOMES)


# --- who may read the metrics ------------------------------------------------------------


async def test_loopback_reads_the_metrics_a_forwarded_request_does_not(
    client: TestClient[Any, Any], scrape: Scrape
) -> None:
    metrics = await scrape()
    assert metrics.content_type.startswith("text/plain")
    assert "version=0.0.4" in metrics.content_type
    assert metrics.value("rpc_server_receipt_backlog_up") == 1
    for header in (
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Real-IP": "203.0.113.9"},
    ):
        response = await client.get("/metrics", headers=header)
        assert response.status == 403, header
        assert response.content_type == "application/json"
        body = await response.json()
        assert body["status"] == "forbidden"
        assert "RPC_SERVER_METRICS_TOKEN" in body["message"]
        assert "rpc_server" not in (await response.text()).replace("RPC_SERVER_METRICS_TOKEN", "")


async def test_the_metrics_token_lets_a_scraper_through_a_proxy(
    app_client: AppClientFactory, settings: Settings
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, metrics_token=METRICS_TOKEN))
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    metrics = await scrape_of(client, {**forwarded, **bearer(METRICS_TOKEN)})
    assert metrics.value("rpc_server_receipt_backlog_up") == 1
    wrong_ones = (
        {**forwarded, **bearer(METRICS_TOKEN + "x")},
        forwarded,
        {**forwarded, "Authorization": f"Basic {METRICS_TOKEN}"},
    )
    for wrong in wrong_ones:
        response = await client.get("/metrics", headers=wrong)
        assert response.status == 403, wrong
    # Loopback without a database_proxy header still needs no token.
    assert (await client.get("/metrics")).status == 200


async def test_without_metrics_there_is_no_metrics_page(
    app_client: AppClientFactory, settings: Settings
) -> None:
    client = await app_client(settings=dataclasses.replace(settings, metrics=False))
    assert (await client.get("/metrics")).status == 404
    assert "result" in (await send(client, request_object("course.list"))).json


# --- the database away during a scrape ---------------------------------------------------


@pytest.mark.backends("postgresql")
async def test_a_scrape_while_the_database_is_away_answers_with_backlog_up_0(
    database_url: str, database_proxy: TcpProxy, app_client: AppClientFactory, settings: Settings
) -> None:
    proxied_url = make_url(database_url).set(port=database_proxy.port)
    proxied = proxied_url.render_as_string(hide_password=False)
    client = await app_client(
        settings=dataclasses.replace(
            settings, database_url=proxied, db_connect_timeout=1.0, mail_in_serve=False
        )
    )
    assert "result" in (await send(client, request_object("course.list"))).json
    up = await scrape_of(client)
    assert up.value("rpc_server_receipt_backlog_up") == 1

    await database_proxy.stop()
    down = await scrape_of(client)
    assert down.value("rpc_server_receipt_backlog_up") == 0
    assert down.series("rpc_server_receipts") == {}
    assert down.series("rpc_server_receipt_oldest_pending_age_seconds") == {}
    assert down.calls() == {("course.list", "ok"): 1}  # the process's own series still there

    await database_proxy.start()
    back = await eventually(
        lambda: scrape_of(client),
        lambda m: m.value("rpc_server_receipt_backlog_up") == 1,
        "the backlog read again",
    )
    assert back.value("rpc_server_receipts", status="pending") == 0
