"""``purchase.events`` and the audit trail over HTTP (issue 14); the already-registered 409.

Every state change, creation included, appends exactly one ``purchase_events`` row in
its own transaction; refusals, repeats and conflicts append none. ``seq`` is strictly
increasing in the order the changes were made (and, here, gapless). The history is
visible to the owner, staff and the payments scope, oldest first, and answers 404 to
another buyer; a buyer sees who made a change only for their own changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import World
from tests.e2e.conftest import request_object, send
from tests.e2e.test_payments import (
    CONFLICT,
    EVIDENCE,
    NOT_FOUND,
    call,
    create,
    error_of,
    events,
    fulfill,
    get,
    refusal,
    result_of,
    scalar,
    snapshot,
)
from tests.payments import OTHER_PAYMENT_KEY, proof_for, webhook_request

EVENT_FIELDS = {
    "seq", "purchase_id", "from_state", "to_state", "actor_scope", "actor_email", "source",
    "evidence", "payment_ref", "error_msg", "created_at",
}  # fmt: skip
UNAUTHENTICATED = 401


async def hook(client: TestClient[Any, Any], proof: dict[str, Any]) -> dict[str, Any]:
    headers, body = webhook_request(proof)
    response = await client.post("/webhooks/payments", data=body, headers=headers)
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


# --- one purchase's history -----------------------------------------------------------------


async def test_history_is_oldest_first_creation_then_each_change(
    client: TestClient[Any, Any], world: World
) -> None:
    purchase = await create(client, world.alice.token)
    pid = purchase["purchase_id"]
    await fulfill(client, world.alice.token, pid, "failed", error_msg="Card declined")
    await fulfill(client, world.alice.token, pid, proof=proof_for(purchase, payment_ref="pi_1"))

    history = await events(client, world.alice.token, pid)

    assert [set(event) for event in history] == [EVENT_FIELDS] * 3
    assert all(event["purchase_id"] == pid for event in history)
    created, failed, fulfilled = history
    assert created == {
        **created,
        "from_state": None, "to_state": "pending", "actor_scope": "buyer",
        "actor_email": "alice@example.com", "source": "rpc", "evidence": None,
        "payment_ref": None, "error_msg": None,
    }  # fmt: skip
    assert (failed["from_state"], failed["to_state"]) == ("pending", "failed")
    assert (failed["error_msg"], failed["evidence"]) == ("Card declined", None)
    assert (fulfilled["from_state"], fulfilled["to_state"]) == ("failed", "fulfilled")
    assert (fulfilled["evidence"], fulfilled["payment_ref"]) == ("payment_event", "pi_1")
    assert fulfilled["error_msg"] is None
    seqs = [event["seq"] for event in history]
    assert all(isinstance(seq, int) for seq in seqs)
    assert seqs == sorted(set(seqs))  # strictly increasing
    moments = [datetime.fromisoformat(event["created_at"]) for event in history]
    assert all(moment.tzinfo is not None for moment in moments)
    assert moments == sorted(moments)
    assert datetime.fromisoformat(purchase["created_at"]) == moments[0]


async def test_owner_staff_and_payments_see_the_history_another_buyer_gets_404(
    client: TestClient[Any, Any], world: World
) -> None:
    purchase = await create(client, world.alice.token)
    pid = purchase["purchase_id"]
    await fulfill(client, world.alice.token, pid, proof=proof_for(purchase))

    seen = {
        who: await events(client, getattr(world, who).token, pid)
        for who in ("alice", "staff", "payments")
    }
    assert seen["alice"] == seen["staff"] == seen["payments"]
    assert [event["to_state"] for event in seen["alice"]] == ["pending", "fulfilled"]

    for token, purchase_id in ((world.bob.token, pid), (world.alice.token, "0" * 32)):
        reply = await call(client, "purchase.events", {"purchase_id": purchase_id}, token=token)
        error = error_of(reply, NOT_FOUND)
        assert error["data"] == {"purchase_id": purchase_id}
    # Another buyer's answer is the same as for a purchase that does not exist.
    bobs = await call(client, "purchase.events", {"purchase_id": pid}, token=world.bob.token)
    missing = await call(
        client, "purchase.events", {"purchase_id": "0" * 32}, token=world.bob.token
    )
    assert bobs.json["error"]["message"] == missing.json["error"]["message"]
    anonymous = await send(client, request_object("purchase.events", {"purchase_id": pid}))
    error_of(anonymous, UNAUTHENTICATED)


async def test_a_buyer_sees_who_made_a_change_only_for_their_own_changes(
    client: TestClient[Any, Any], world: World
) -> None:
    canceled = await create(client, world.alice.token)
    comped = await create(client, world.alice.token)
    paid = await create(client, world.alice.token, "sql-fundamentals")
    await fulfill(client, world.staff.token, canceled["purchase_id"], "canceled")
    await fulfill(client, world.staff.token, comped["purchase_id"])
    await hook(client, proof_for(paid, outcome="payment.failed", error_message="No funds"))
    await fulfill(client, world.payments.token, paid["purchase_id"])

    expectations = [
        (canceled, "canceled", "staff", "support@example.com", "rpc", None),
        (comped, "fulfilled", "staff", "support@example.com", "rpc", "staff_comp"),
        (paid, "fulfilled", "payments", "payments@example.com", "rpc", "payments_scope"),
    ]
    for purchase, state, scope, email, source, evidence in expectations:
        as_owner = (await events(client, world.alice.token, purchase["purchase_id"]))[-1]
        as_staff = (await events(client, world.staff.token, purchase["purchase_id"]))[-1]
        as_payments = (await events(client, world.payments.token, purchase["purchase_id"]))[-1]
        assert as_owner["to_state"] == state
        assert (as_owner["actor_scope"], as_owner["actor_email"]) == (scope, None)
        assert as_owner["source"] == source and as_owner["evidence"] == evidence
        assert as_staff == as_payments == {**as_owner, "actor_email": email}
        # Her own creation of it she sees with her email.
        first = (await events(client, world.alice.token, purchase["purchase_id"]))[0]
        assert first["actor_email"] == "alice@example.com"
    # The webhook's change: no actor for anyone.
    failed = (await events(client, world.staff.token, paid["purchase_id"]))[1]
    assert failed["to_state"] == "failed"
    assert (failed["actor_scope"], failed["actor_email"], failed["source"]) == (
        None, None, "webhook",
    )  # fmt: skip
    assert failed["error_msg"] == "No funds"


# --- the audit invariants after a mixed sequence ----------------------------------------------


@dataclass
class Change:
    purchase_id: str
    from_state: str | None
    to_state: str
    actor_scope: str | None
    source: str
    evidence: str | None


class Script:
    """Makes calls and writes down the state changes they must have made, in order."""

    def __init__(self, client: TestClient[Any, Any], world: World):
        self.client = client
        self.world = world
        self.changes: list[Change] = []
        self.states: dict[str, str] = {}

    def expect(
        self,
        purchase: dict[str, Any],
        to: str,
        scope: str | None,
        source: str,
        evidence: str | None = None,
    ) -> None:
        pid = purchase["purchase_id"]
        self.changes.append(Change(pid, self.states.get(pid), to, scope, source, evidence))
        self.states[pid] = to

    async def create(self, who: str, course: str = "python-basics") -> dict[str, Any]:
        purchase = await create(self.client, getattr(self.world, who).token, course)
        self.expect(purchase, "pending", "buyer", "rpc")
        return purchase


async def test_every_state_change_has_exactly_one_event_and_nothing_else_writes_one(
    client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    s = Script(client, world)
    alice, bob = world.alice.token, world.bob.token
    staff, payments = world.staff.token, world.payments.token

    p1 = await s.create("alice")
    p1_id = p1["purchase_id"]
    result_of(await fulfill(client, alice, p1_id, "failed", error_msg="declined"))
    s.expect(p1, "failed", "buyer", "rpc")
    result_of(await fulfill(client, alice, p1_id, "failed", error_msg="again"))  # REPEAT
    assert refusal(await fulfill(client, alice, p1_id)) == "missing"
    p1_proof = proof_for(p1, payment_ref="pi_p1")
    result_of(await fulfill(client, alice, p1_id, proof=p1_proof))
    s.expect(p1, "fulfilled", "buyer", "rpc", "payment_event")
    result_of(await fulfill(client, alice, p1_id))  # REPEAT
    error_of(await fulfill(client, alice, p1_id, "canceled"), CONFLICT)
    assert (await hook(client, p1_proof))["status"] == "duplicate"

    p2 = await s.create("alice", "sql-fundamentals")
    result_of(await fulfill(client, staff, p2["purchase_id"], "canceled"))
    s.expect(p2, "canceled", "staff", "rpc")
    error_of(await fulfill(client, alice, p2["purchase_id"], proof=proof_for(p2)), CONFLICT)
    assert (await hook(client, proof_for(p2)))["status"] == "conflict"

    p3 = await s.create("bob")
    failed = proof_for(p3, outcome="payment.failed", error_message="3DS failed")
    assert (await hook(client, failed))["status"] == "applied"
    s.expect(p3, "failed", None, "webhook", "payment_event")
    assert (await hook(client, failed))["status"] == "duplicate"
    result_of(await fulfill(client, payments, p3["purchase_id"]))
    s.expect(p3, "fulfilled", "payments", "rpc", "payments_scope")
    assert (await hook(client, proof_for(p3)))["status"] == "repeated"

    p4 = await s.create("bob", "sql-fundamentals")
    for proof, reason in (
        (proof_for(p4, key=OTHER_PAYMENT_KEY), "invalid_signature"),
        (proof_for(p1), "mismatch"),
        (proof_for(p4, payment_ref="pi_p1"), "reused"),
    ):
        assert refusal(await fulfill(client, bob, p4["purchase_id"], proof=proof)) == reason
    result_of(await fulfill(client, staff, p4["purchase_id"]))
    s.expect(p4, "fulfilled", "staff", "rpc", "staff_comp")
    error_of(await fulfill(client, bob, p4["purchase_id"], "canceled"), CONFLICT)

    p5 = await s.create("alice", "sql-fundamentals")
    result_of(await fulfill(client, alice, p5["purchase_id"], "failed"))
    s.expect(p5, "failed", "buyer", "rpc")
    result_of(await fulfill(client, alice, p5["purchase_id"], "canceled"))
    s.expect(p5, "canceled", "buyer", "rpc")
    result_of(await fulfill(client, alice, p5["purchase_id"], "canceled"))  # REPEAT

    # Already registered: 409, nothing created (so no creation event either).
    again = await call(client, "purchase.create", {"course": "python-basics"}, token=alice)
    error_of(again, CONFLICT)

    # Through the API: each purchase's history is exactly its changes, in order.
    for pid in s.states:
        history = await events(client, staff, pid)
        seen = [
            Change(
                pid,
                *(e[k] for k in ("from_state", "to_state", "actor_scope", "source", "evidence")),
            )
            for e in history
        ]
        assert seen == [change for change in s.changes if change.purchase_id == pid]
        assert history[-1]["to_state"] == s.states[pid]
        assert (await get(client, staff, pid))["state"] == s.states[pid]

    # In the database: one row per change, numbered in the order they were made.
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT e.seq, p.purchase_id, e.from_state, e.to_state, e.actor_scope, "
                    "e.source, e.evidence FROM purchase_events e "
                    "JOIN purchases p ON p.id = e.purchase_id ORDER BY e.seq"
                )
            )
        ).all()
    assert [Change(*row[1:]) for row in rows] == s.changes
    seqs = [row[0] for row in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # strictly increasing, no gap
    assert await scalar(engine, "SELECT last_seq FROM event_sequence") == seqs[-1]

    # Nothing is fulfilled without a proof, a payments actor or a staff comp; one
    # registration and one receipt per fulfilled purchase, none for the others.
    fulfilled = [c for c in s.changes if c.to_state == "fulfilled"]
    assert all(change.evidence in EVIDENCE for change in fulfilled)
    assert len({change.purchase_id for change in fulfilled}) == len(fulfilled)
    counts = (await snapshot(engine)).counts
    assert counts == {
        "purchases": 5,
        "course_registrations": len(fulfilled),
        "receipt_outbox": len(fulfilled),
        "purchase_events": len(s.changes),
    }
    registered = await scalar(
        engine,
        "SELECT count(*) FROM course_registrations r JOIN purchases p ON p.id = r.purchase_id "
        "WHERE p.state = 'fulfilled'",
    )
    assert registered == len(fulfilled)


# --- purchase.create for a course one is registered for ------------------------------------------


@pytest.mark.parametrize("how", ["proof", "webhook", "payments", "staff_comp"])
async def test_create_for_an_already_registered_course_is_409_and_creates_nothing(
    how: str, client: TestClient[Any, Any], world: World, engine: AsyncEngine
) -> None:
    alice = world.alice.token
    first = await create(client, alice, idempotency_key="checkout-1")
    pid = first["purchase_id"]
    if how == "proof":
        result_of(await fulfill(client, alice, pid, proof=proof_for(first)))
    elif how == "webhook":
        assert (await hook(client, proof_for(first)))["status"] == "applied"
    else:
        token = world.payments.token if how == "payments" else world.staff.token
        result_of(await fulfill(client, token, pid))
    before = await snapshot(engine)

    for params in (
        {"course": "python-basics"},
        {"course": "python-basics", "idempotency_key": "checkout-2"},
    ):
        reply = await call(client, "purchase.create", params, token=alice)
        error = error_of(reply, CONFLICT)
        assert error["message"] == "You are already registered for this course"
        assert error["data"] == {"course": "python-basics"}
    assert await snapshot(engine) == before

    # The original create, replayed with its key, still answers its purchase (as now).
    replay = result_of(
        await call(
            client,
            "purchase.create",
            {"course": "python-basics", "idempotency_key": "checkout-1"},
            token=alice,
        )
    )
    assert replay["purchase_id"] == pid
    assert replay["state"] == "fulfilled"
    assert await snapshot(engine) == before
    # Other courses, and other buyers of this one, are not affected.
    await create(client, alice, "sql-fundamentals")
    await create(client, world.bob.token)


async def test_a_pending_canceled_or_failed_purchase_does_not_block_a_new_one(
    client: TestClient[Any, Any], world: World
) -> None:
    alice = world.alice.token
    pending = await create(client, alice)
    canceled = await create(client, alice)
    failed = await create(client, alice)
    await fulfill(client, alice, canceled["purchase_id"], "canceled")
    await fulfill(client, alice, failed["purchase_id"], "failed")
    again = await create(client, alice)
    assert again["purchase_id"] not in {
        pending["purchase_id"], canceled["purchase_id"], failed["purchase_id"],
    }  # fmt: skip
