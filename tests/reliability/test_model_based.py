"""Model-based: random call sequences against a real server agree with a model of the shop.

A Hypothesis ``RuleBasedStateMachine`` drives one real ``rpc-server serve`` process
(``tests.processes.running_server``) on the test's own database, SQLite and PostgreSQL,
over plain HTTP (``urllib``: synchronous, so the machine stays synchronous). The callers
are two buyers (alice, bob), the support desk (a ``staff`` token), the shop's payment
backend (a ``payments`` token) and a stranger whose token is unknown; the payment
provider also posts signed payment events to ``POST /webhooks/payments``. The rules:

- ``purchase.create`` (idempotency keys replayed and reused, unknown courses, a course
  the caller is already registered for);
- ``purchase.fulfill`` asking for fulfilled, failed or canceled, by the owner, staff or
  the payment backend, with no proof or with a signed payment event as
  ``payment_proof``: a valid one, or one for another purchase or an unknown one, of
  another amount, currency or outcome, with a ``payment_ref`` that already fulfilled a
  purchase, expired or dated ahead, signed with another key, tampered with after
  signing (payload, bytes, id, timestamp) or with a malformed signature, or an event
  sent before (either way); and with invalid params (proofs of the wrong shape,
  ``error_msg`` too long or not printable, ids, states) by anyone;
- webhook deliveries of new signed events (the same faults) and replays of events sent
  before, as a proof or as a delivery;
- ``purchase.get``, ``purchase.list`` (following ``next_cursor`` to the last page),
  ``purchase.events`` and ``registration.list`` by anyone.

A small in-memory model, written from the README and the tables of
``rpc_server/domain/states.py`` (not imported from the server), predicts every answer
exactly: the result (the purchase as every answer shows it, the redirect, each history
entry with its sequence number) or the error code and data (402 with its reason, 404,
409, invalid params, unauthenticated), and each webhook answer's HTTP status and body.
Evidence is checked only where the state table applies a change (a repeat needs none);
a proof, when given there, is always verified and must fit; a ``payment.failed`` event
records its own message (or "Payment failed"), however it came in.

After every step the invariants read the database itself:

- the model's view: every purchase's owner, course, state, error_msg, idempotency key,
  payment_ref and times; every history row (purchase, from and to state, actor and
  scope, source, evidence, payment event id, payment_ref, error_msg, time) in order;
  every registration and receipt outbox row. So a refused call (any error, a 402, a
  webhook refusal, a duplicate or a conflict) wrote nothing;
- and, without the model: no purchase is fulfilled unless its one ``fulfilled`` event's
  evidence is ``payment_event`` (with the purchase's payment_ref, unique across
  purchases), ``payments_scope`` (a payments-scope actor) or ``staff_comp`` (a staff
  actor); every purchase's events form a chain (the first from NULL to pending, each
  next from the previous one's to, never to the same state, the last to the current
  state), so exactly one event per state change; ``seq`` increases by one per event,
  gapless, as far as ``event_sequence`` says; exactly one registration (the owner's,
  for the course) and one outbox row (to the owner) per fulfilled purchase and none
  for any other.

Each example starts from an empty shop: the machine deletes the purchases, their
events, registrations and receipts, keeping users, tokens and courses. The server is
idle between examples and keeps nothing about purchases in memory (the rate limiter,
which keeps counts, is off), so every example, and the minimal failing one Hypothesis
prints, stands alone. The events' signing times are taken when they are built, so
every valid event stays within the server's 300 s tolerance for the few seconds an
example takes.

Before the random examples, a scripted tour (``ShopMachine.tour``) takes one example
through every outcome the model knows, each step checked the same way and required to
end as named, so that no tuning of the strategies can lose one; the random examples
must then reach the common outcomes on their own (``REQUIRED_OUTCOMES``).

The examples are derandomized (the same on every run) and no example database is kept.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from rpc_server.db.unit_of_work import SqlUnitOfWorkFactory
from rpc_server.domain import services
from tests.conftest import FRONTEND_URL, World
from tests.payments import TEST_PAYMENT_KEY, webhook_request
from tests.processes import running_server
from tests.reliability.model_payments import (
    BAD_PROOF_SHAPES,
    FAILED,
    PROOF_SPECS,
    SUCCEEDED,
    WEBHOOK_STATUS,
    ProofSpec,
    SentEvent,
    build_event,
    fit_refusal,
    misshapen,
    new_payment_ref,
)

T = TypeVar("T")

# Examples per run (on each engine) and the most steps in one.
EXAMPLES = 100
STEPS = 30

UNAUTHENTICATED, PAYMENT_NOT_VERIFIED, NOT_FOUND, CONFLICT = 401, 402, 404, 409
INVALID_PARAMS = -32602

# The model of the shop, written from the README (not imported from the server).
COURSES = {
    "python-basics": ("49.00", "USD"),
    "sql-fundamentals": ("39.50", "EUR"),
    "http-apis": ("12.50", "USD"),  # added by the test
}
UNKNOWN_COURSE = "no-such-course"
REQUESTABLE = ("fulfilled", "failed", "canceled")
STATES = ("pending", *REQUESTABLE)
APPLY, REPEAT, REFUSE = "apply", "repeat", "refuse"
STATE_TABLE = {
    ("pending", "fulfilled"): APPLY, ("pending", "failed"): APPLY, ("pending", "canceled"): APPLY,
    ("failed", "fulfilled"): APPLY, ("failed", "failed"): REPEAT, ("failed", "canceled"): APPLY,
    ("fulfilled", "fulfilled"): REPEAT, ("fulfilled", "failed"): REFUSE,
    ("fulfilled", "canceled"): REFUSE,
    ("canceled", "fulfilled"): REFUSE, ("canceled", "failed"): REFUSE,
    ("canceled", "canceled"): REPEAT,
}  # fmt: skip
# Who may ask for which outcome when the table says APPLY, by token scope: "anyone",
# "proof" (a verified payment event) or "proof_or_comp" (staff without one: a comp).
EVIDENCE_TABLE = {
    ("buyer", "canceled"): "anyone", ("buyer", "failed"): "anyone",
    ("buyer", "fulfilled"): "proof",
    ("payments", "canceled"): "anyone", ("payments", "failed"): "anyone",
    ("payments", "fulfilled"): "anyone",
    ("staff", "canceled"): "anyone", ("staff", "failed"): "anyone",
    ("staff", "fulfilled"): "proof_or_comp",
}  # fmt: skip
SEES_EVERY_PURCHASE = ("staff", "payments")
# The history's evidence of each backed change.
PAYMENT_EVENT, PAYMENTS_SCOPE, STAFF_COMP = "payment_event", "payments_scope", "staff_comp"
PAYMENT_FAILED = "Payment failed"  # what a payment.failed event without error_message records
NEW_PURCHASE_ID = re.compile(r"[0-9a-f]{32}")
ACCEPTED_PURCHASE_ID = re.compile(r"[0-9a-z]{1,64}")  # what purchase_id params may look like
MAX_ERROR_MSG = 1000
DEFAULT_LIMIT = 20

# Repeated values weigh the draws: one call in eleven is the stranger's, one purchase in
# seven is of a course that does not exist.
CALLERS = st.sampled_from(
    ("alice",) * 3 + ("bob",) * 3 + ("staff",) * 2 + ("payments",) * 2 + ("stranger",)
)
COURSE_SLUGS = st.sampled_from((*COURSES,) * 2 + (UNKNOWN_COURSE,))
# A small pool, so replays and reuse for another course happen; the last three are
# invalid (a NUL character, empty, too long).
IDEMPOTENCY_KEYS = st.none() | st.sampled_from(
    ("order-1", "order-2") * 3 + ("k" * 64, "clé-ü", "nul\x00", "", "k" * 65)
)
ORDERS = st.tuples(CALLERS, COURSE_SLUGS, IDEMPOTENCY_KEYS)
# error_msg must be printable text: a NUL, a newline or any other non-printable
# character is invalid params.
ERROR_MSGS = (
    st.none()
    | st.sampled_from(("card declined", "declined\x00", "line\nbreak", "", "x" * MAX_ERROR_MSG))
    | st.text(max_size=20)
)
PRINTABLE_ERROR_MSGS = st.none() | st.sampled_from(("card declined", "", "x" * MAX_ERROR_MSG))
# Who asks for an outcome in the everyday rules, and with which proof: none, a new one,
# one sent before, or a new one with a payment_ref that already fulfilled a purchase.
# One draw picks a pair, so each pair is as likely.
PAYERS = st.sampled_from(
    (
        ("owner", "new"), ("owner", "none"), ("staff", "none"), ("payments", "none"),
        ("owner", "new"), ("staff", "new"), ("payments", "new"), ("owner", "earlier"),
        ("owner", "reused"),
    )
)  # fmt: skip
GIVERS_UP = st.sampled_from(
    (
        ("owner", "failed", "none"), ("owner", "canceled", "none"),
        ("owner", "failed", "new"), ("staff", "canceled", "none"),
        ("payments", "failed", "none"), ("staff", "failed", "new"),
        ("owner", "canceled", "new"), ("payments", "failed", "earlier"),
    )
)  # fmt: skip
# Any proof: none, a new event, or one of the wrong JSON shape (invalid params).
ANY_PROOFS = st.sampled_from(("none", "new", "shape"))
# For the rules that also try what the server must refuse as invalid params.
ANY_REQUESTED_STATE = st.sampled_from(STATES)  # pending cannot be requested
ANY_ERROR_MSG = ERROR_MSGS | st.just("x" * (MAX_ERROR_MSG + 1))
# Ids the model never saw: well-formed ones (404) and malformed ones (invalid params).
UNKNOWN_PURCHASE_IDS = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32) | (
    st.sampled_from(("zzzz", "NOT-AN-ID", "z" * 65))
)
LIST_STATES = st.none() | st.sampled_from(STATES)
LIMITS = st.sampled_from((None, 1, 2, 3))  # None: the default, 20
EVENT_PICKS = st.integers(min_value=0, max_value=63)
READS = ("purchase.get", "purchase.events", "purchase.list", "registration.list") * 2 + (
    "purchase.events",
)
FAULTLESS = ProofSpec(frozenset(), None, 0)


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    token: str
    email: str | None  # None: the token belongs to nobody
    scope: str | None = None  # buyer, staff or payments; None for the stranger

    @property
    def sees_every_purchase(self) -> bool:
        return self.scope in SEES_EVERY_PURCHASE


@dataclass
class ModelPurchase:
    purchase_id: str
    owner: str
    course: str
    idempotency_key: str | None
    shown: dict[str, Any]  # the purchase as every answer must show it now
    state: str = "pending"
    error_msg: str | None = None
    payment_ref: str | None = None  # the payment that fulfilled it


@dataclass(frozen=True)
class ModelEvent:
    """One history row, as purchase.events and the database must hold it."""

    purchase_id: str
    from_state: str | None
    to_state: str
    actor: str | None  # a caller's name; None: the webhook
    actor_scope: str | None
    source: str
    evidence: str | None
    payment_event_id: str | None
    payment_ref: str | None
    error_msg: str | None
    created_at: str


@dataclass
class Shop:
    purchases: dict[str, ModelPurchase] = field(default_factory=dict)  # in creation order
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, key) -> id
    fulfilled: list[ModelPurchase] = field(default_factory=list)  # in fulfillment order
    events: list[ModelEvent] = field(default_factory=list)  # in seq order
    # payment_ref -> the purchase it fulfilled, in that order (picked by position: runs repeat)
    refs: dict[str, str] = field(default_factory=dict)
    applied_event_ids: set[str] = field(default_factory=set)  # payment events that changed one
    sent: list[SentEvent] = field(default_factory=list)  # every payment event built

    def visible_to(self, caller: Caller, purchase_id: str) -> ModelPurchase | None:
        purchase = self.purchases.get(purchase_id)
        if purchase is None or not (caller.sees_every_purchase or purchase.owner == caller.name):
            return None
        return purchase

    def registered(self, owner: str, course: str) -> bool:
        return any(p.owner == owner and p.course == course for p in self.fulfilled)


def redirect_url(purchase: ModelPurchase) -> str:
    if purchase.state == "fulfilled":
        return f"{FRONTEND_URL}/courses/{purchase.course}/start"
    if purchase.state == "failed":
        return f"{FRONTEND_URL}/checkout/{purchase.purchase_id}"
    return f"{FRONTEND_URL}/courses/{purchase.course}"


def is_error(answer: dict[str, Any], code: int) -> bool:
    return "error" in answer and answer["error"].get("code") == code


def result_of(answer: dict[str, Any]) -> Any:
    assert "error" not in answer, f"expected a result, got {answer}"
    return answer["result"]


def at(value: str) -> datetime:
    """A time as an answer shows it."""
    return datetime.fromisoformat(value)


def moment(value: Any) -> datetime | None:
    """A time from an answer (ISO text) or the database (text on SQLite), in UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def outcome_for(requested: str) -> str:
    """The payment event that backs a request (a canceled one has none: succeeded)."""
    return FAILED if requested == "failed" else SUCCEEDED


def failure_message(requested: str, error_msg: str | None, event: SentEvent | None) -> str | None:
    """The error_msg a change to ``requested`` records: only ``failed`` records one, the
    signed payment.failed event's own message (however it came in) before the caller's."""
    if requested != "failed":
        return None
    if event is not None:
        return event.error_message or PAYMENT_FAILED
    return error_msg


def flipped(outcome: str) -> str:
    return FAILED if outcome == SUCCEEDED else SUCCEEDED


# --- the real service -------------------------------------------------------------------


class RpcClient:
    """One JSON-RPC call (or webhook delivery) per HTTP request, synchronously."""

    def __init__(self, base_url: str):
        self.url = f"{base_url}/rpc"
        self.webhook_url = f"{base_url}/webhooks/payments"
        self.calls = 0
        self.deliveries = 0

    def call(self, method: str, params: dict[str, Any], token: str) -> dict[str, Any]:
        self.calls += 1
        body = {"jsonrpc": "2.0", "method": method, "params": params, "id": self.calls}
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            with error:
                raise AssertionError(f"HTTP {error.code}: {error.read()!r}") from None
        answer: dict[str, Any] = json.loads(raw)
        assert answer.get("jsonrpc") == "2.0" and answer.get("id") == self.calls, answer
        return answer

    def deliver(self, event: SentEvent) -> tuple[int, dict[str, Any]]:
        """POST the event to the webhook; return the HTTP status and the JSON body."""
        self.deliveries += 1
        headers, body = webhook_request(event.proof)
        request = urllib.request.Request(self.webhook_url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                status, raw = error.code, error.read()
        return status, json.loads(raw)


@dataclass(frozen=True)
class Snapshot:
    """Every row a state change writes, read in one go."""

    purchases: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    registrations: list[tuple[Any, ...]]
    receipts: list[tuple[Any, ...]]
    last_seq: int


SNAPSHOT_QUERIES = {
    "purchases": (
        "SELECT p.purchase_id, u.email, c.slug, p.state, p.error_msg, p.idempotency_key, "
        "p.payment_ref, p.created_at, p.updated_at, p.fulfilled_at "
        "FROM purchases p JOIN users u ON u.id = p.owner_id "
        "JOIN courses c ON c.id = p.course_id"
    ),
    "events": (
        "SELECT e.seq, p.purchase_id, e.from_state, e.to_state, u.email, e.actor_scope, "
        "e.source, e.evidence, e.payment_event_id, e.payment_ref, e.error_msg, e.created_at "
        "FROM purchase_events e JOIN purchases p ON p.id = e.purchase_id "
        "LEFT JOIN users u ON u.id = e.actor_user_id ORDER BY e.seq"
    ),
    "registrations": (
        "SELECT p.purchase_id, u.email, c.slug FROM course_registrations r "
        "JOIN purchases p ON p.id = r.purchase_id JOIN users u ON u.id = r.user_id "
        "JOIN courses c ON c.id = r.course_id"
    ),
    "receipts": (
        "SELECT p.purchase_id, o.recipient FROM receipt_outbox o "
        "JOIN purchases p ON p.id = o.purchase_id"
    ),
}


class Database:
    """The server's database as the invariants see it, from the machine's thread.

    The engine belongs to the test's event loop, which waits in ``asyncio.to_thread``
    while the machine runs; each read is handed to that loop.
    """

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.snapshots = 0

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    @staticmethod
    async def _last_seq(connection: AsyncConnection) -> int:
        return int((await connection.execute(text("SELECT last_seq FROM event_sequence"))).one()[0])

    def snapshot(self) -> Snapshot:
        async def read() -> Snapshot:
            async with self.engine.connect() as connection:
                rows = {
                    name: [tuple(row) for row in await connection.execute(text(sql))]
                    for name, sql in SNAPSHOT_QUERIES.items()
                }
                return Snapshot(**rows, last_seq=await self._last_seq(connection))

        self.snapshots += 1
        return self._run(read())

    def empty_shop(self) -> int:
        """Delete every purchase with its history, registration and receipt; return
        the last seq handed out so far."""

        async def delete() -> int:
            # The first statement writes: on SQLite the deferred BEGIN takes the write
            # lock there (waiting out the busy timeout), never upgrading a read lock.
            async with self.engine.begin() as connection:
                for table in (
                    "purchase_events", "receipt_outbox", "course_registrations", "purchases"
                ):  # fmt: skip
                    await connection.execute(text(f"DELETE FROM {table}"))
                return await self._last_seq(connection)

        return self._run(delete())


@dataclass
class Tally:
    examples: int = 0
    steps: int = 0
    invariant_checks: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Service:
    """What a machine run talks to: the server, its database, the callers, the tally."""

    client: RpcClient
    database: Database
    callers: dict[str, Caller]
    tally: Tally


# --- the machine ------------------------------------------------------------------------


class ShopMachine(RuleBasedStateMachine):
    """Rules call the server and check each answer; invariants check the database.

    Bound to a running server by a subclass that sets ``service``.
    """

    service: ClassVar[Service]
    purchases = Bundle("purchases")

    def __init__(self) -> None:
        super().__init__()
        self.seq_floor = self.service.database.empty_shop()  # events number from here on
        self.shop = Shop()
        self.service.tally.examples += 1

    # -- helpers --

    def call(self, caller: Caller, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.service.client.call(method, params, caller.token)

    def step(self, caller: str) -> Caller:
        self.service.tally.steps += 1
        return self.service.callers[caller]

    def outcome(self, name: str) -> None:
        self.service.tally.outcomes[name] += 1

    def refused(
        self, answer: dict[str, Any], method: str, code: int, data: Any = None, name: str = ""
    ) -> None:
        """Check that the call was answered with error ``code`` (and ``data``, if given)."""
        assert "result" not in answer and is_error(answer, code), f"expected {code}: {answer}"
        if data is not None:
            assert answer["error"].get("data") == data, answer
        self.outcome(f"{method} {code}{name}")

    def not_verified(self, answer: dict[str, Any], reason: str) -> None:
        self.refused(answer, "fulfill", PAYMENT_NOT_VERIFIED, {"reason": reason}, f" {reason}")
        assert answer["error"]["message"].startswith("Payment not verified: "), answer

    def email_of(self, name: str) -> str:
        email = self.service.callers[name].email
        assert email is not None
        return email

    def caller_named(self, name: str) -> Caller:
        return self.service.callers[name]

    # -- payment events --

    def new_event(
        self, spec: ProofSpec, purchase_id: str, outcome: str, other: str | None
    ) -> SentEvent:
        """Sign an event paying for ``purchase_id`` with ``outcome``, with the spec's
        faults; ``other`` is the purchase an ``other_purchase`` fault pays for."""
        target = self.shop.purchases.get(purchase_id)
        if not ACCEPTED_PURCHASE_ID.fullmatch(purchase_id):
            purchase_id = secrets.token_hex(16)  # the call is refused before the proof
        if "other_purchase" in spec.faults and other is not None:
            target = self.shop.purchases[other]
            purchase_id = other
        amount, currency = COURSES[target.course] if target else COURSES["python-basics"]
        if "unknown_purchase" in spec.faults:
            purchase_id = secrets.token_hex(16)
        ref = new_payment_ref()
        if "reused_ref" in spec.faults and self.shop.refs:
            ref = list(self.shop.refs)[spec.pick % len(self.shop.refs)]
        event = build_event(
            spec.faults,
            purchase_id=purchase_id,
            amount=amount,
            currency=currency,
            outcome=flipped(outcome) if "wrong_outcome" in spec.faults else outcome,
            payment_ref=ref,
            error_message=spec.error_message,
        )
        self.shop.sent.append(event)
        return event

    def proof_event(
        self, proof: str, spec: ProofSpec, pick: int, purchase_id: str, requested: str, other: str
    ) -> SentEvent | None:
        """No proof, a new event drawn as ``spec`` (or only with a used payment_ref), or
        the one sent before that ``pick`` picks (a new one if none was)."""
        if proof == "none":
            return None
        if proof == "earlier" and self.shop.sent:
            self.outcome("proof sent before")
            return self.shop.sent[pick % len(self.shop.sent)]
        if proof == "reused":  # a payment_ref that already fulfilled a purchase, if any
            spec = ProofSpec(frozenset({"reused_ref"}), None, spec.pick)
        return self.new_event(spec, purchase_id, outcome_for(requested), other)

    def fit(self, event: SentEvent, purchase: ModelPurchase, requested: str) -> str | None:
        return fit_refusal(
            event,
            purchase_id=purchase.purchase_id,
            price=COURSES[purchase.course],
            requested=requested,
            holder_of_ref=self.shop.refs.get(event.payment_ref),
        )

    def steered(self, purchase_id: str, open_first: bool) -> str:
        """``purchase_id``, or with ``open_first`` the oldest purchase still pending or
        failed, if there is one. Most calls on a fulfilled or canceled purchase repeat or
        conflict (and check no proof), so half the calls go to one that can change."""
        if open_first:
            for purchase in self.shop.purchases.values():
                if purchase.state in ("pending", "failed"):
                    return purchase.purchase_id
        return purchase_id

    # -- rules: purchases --

    @initialize(target=purchases, orders=st.lists(ORDERS, min_size=1, max_size=5))
    def open_shop(self, orders: list[tuple[str, str, str | None]]) -> Any:
        """Start every example with a few purchases, so the other rules have work."""
        created = [self.create_one(caller, course, key) for caller, course, key in orders]
        return multiple(*(purchase_id for purchase_id in created if purchase_id is not None))

    @rule(target=purchases, caller=CALLERS, course=COURSE_SLUGS, key=IDEMPOTENCY_KEYS)
    def create(self, caller: str, course: str, key: str | None) -> Any:
        purchase_id = self.create_one(caller, course, key)
        return multiple() if purchase_id is None else purchase_id

    def create_one(self, caller: str, course: str, key: str | None) -> str | None:
        """Call purchase.create and check the answer; return the id of a new purchase."""
        who = self.step(caller)
        params = {"course": course} | ({} if key is None else {"idempotency_key": key})
        answer = self.call(who, "purchase.create", params)
        if who.email is None:
            self.refused(answer, "create", UNAUTHENTICATED)
        elif key is not None and not 1 <= len(key) <= 64:
            self.refused(answer, "create", INVALID_PARAMS)
        elif key is not None and "\x00" in key:
            self.refused(answer, "create", INVALID_PARAMS, name=" NUL")
        elif course not in COURSES:
            self.refused(answer, "create", NOT_FOUND, {"course": course})
        elif key is not None and (caller, key) in self.shop.keys:
            earlier = self.shop.purchases[self.shop.keys[(caller, key)]]
            if earlier.course != course:
                self.refused(
                    answer, "create", CONFLICT, {"idempotency_key": key, "course": earlier.course}
                )
            else:
                assert result_of(answer) == earlier.shown, "a replay answers the same purchase"
                self.outcome("create replayed")
        elif self.shop.registered(caller, course):
            self.refused(answer, "create", CONFLICT, {"course": course}, " registered")
            assert answer["error"]["message"] == "You are already registered for this course"
        else:
            return self.created(caller, course, key, result_of(answer))
        return None

    def created(self, caller: str, course: str, key: str | None, shown: dict[str, Any]) -> str:
        purchase_id = str(shown["purchase_id"])
        assert NEW_PURCHASE_ID.fullmatch(purchase_id), shown
        assert purchase_id not in self.shop.purchases, "a new purchase has a new id"
        amount, currency = COURSES[course]
        assert shown == {
            "purchase_id": purchase_id, "course": course, "amount": amount,
            "currency": currency, "state": "pending", "error_msg": None,
            "created_at": shown["created_at"], "updated_at": shown["created_at"],
            "fulfilled_at": None,
        }  # fmt: skip
        self.shop.purchases[purchase_id] = ModelPurchase(purchase_id, caller, course, key, shown)
        if key is not None:
            self.shop.keys[(caller, key)] = purchase_id
        self.shop.events.append(
            ModelEvent(
                purchase_id, None, "pending", caller, self.caller_named(caller).scope, "rpc",
                None, None, None, None, shown["created_at"],
            )
        )  # fmt: skip
        self.outcome("create new")
        return purchase_id

    # -- rules: fulfilment --

    @rule(
        purchase_id=purchases,
        open_first=st.booleans(),
        how=PAYERS,
        spec=PROOF_SPECS,
        pick=EVENT_PICKS,
        other=purchases,
    )
    def pay(
        self,
        purchase_id: str,
        open_first: bool,
        how: tuple[str, str],
        spec: ProofSpec,
        pick: int,
        other: str,
    ) -> None:
        """A payment went through: the buyer passes on the payment step's proof (mostly),
        the support desk or the payment backend says so."""
        by, proof = how
        purchase_id = self.steered(purchase_id, open_first)
        self.fulfill(purchase_id, by, "fulfilled", None, proof, spec, pick, other)

    @rule(
        purchase_id=purchases,
        open_first=st.booleans(),
        how=GIVERS_UP,
        error_msg=PRINTABLE_ERROR_MSGS,
        spec=PROOF_SPECS,
        pick=EVENT_PICKS,
        other=purchases,
    )
    def give_up(
        self,
        purchase_id: str,
        open_first: bool,
        how: tuple[str, str, str],
        error_msg: str | None,
        spec: ProofSpec,
        pick: int,
        other: str,
    ) -> None:
        """A payment failed (reported with or without its signed event), or the buyer
        canceled."""
        by, requested, proof = how
        purchase_id = self.steered(purchase_id, open_first)
        self.fulfill(purchase_id, by, requested, error_msg, proof, spec, pick, other)

    def fulfill(
        self,
        purchase_id: str,
        by: str,
        requested: str,
        error_msg: str | None,
        proof: str,
        spec: ProofSpec,
        pick: int,
        other: str,
    ) -> None:
        caller = self.shop.purchases[purchase_id].owner if by == "owner" else by
        event = self.proof_event(proof, spec, pick, purchase_id, requested, other)
        params = {} if event is None else {"payment_proof": event.proof}
        self.fulfill_call(purchase_id, caller, requested, error_msg, params, event)

    @rule(
        purchase_id=purchases | UNKNOWN_PURCHASE_IDS,
        caller=CALLERS,
        requested=ANY_REQUESTED_STATE,
        error_msg=ANY_ERROR_MSG,
        proof=ANY_PROOFS,
        spec=PROOF_SPECS,
        shape=st.sampled_from(BAD_PROOF_SHAPES),
    )
    def fulfill_anything(
        self,
        purchase_id: str,
        caller: str,
        requested: str,
        error_msg: str | None,
        proof: str,
        spec: ProofSpec,
        shape: str,
    ) -> None:
        """Anyone asks anything of any purchase, known or not, with any params."""
        event, params = None, {}
        if proof == "new":
            event = self.new_event(spec, purchase_id, outcome_for(requested), None)
            params = {"payment_proof": event.proof}
        elif proof == "shape":
            bent = self.new_event(FAULTLESS, purchase_id, SUCCEEDED, None)
            params = {"payment_proof": misshapen(bent.proof, shape)}
        self.fulfill_call(
            purchase_id,
            caller,
            requested,
            error_msg,
            params,
            event,
            misshapen_proof=proof == "shape",
        )

    def fulfill_call(
        self,
        purchase_id: str,
        caller: str,
        requested: str,
        error_msg: str | None,
        extra: dict[str, Any],
        event: SentEvent | None,
        *,
        misshapen_proof: bool = False,
    ) -> None:
        """Call purchase.fulfill and check the answer, predicted in the order the server
        decides: token, params, visibility, the state table, then evidence (the proof
        verified and fitted, or what the caller's scope may do without one)."""
        who = self.step(caller)
        params = {"purchase_id": purchase_id, "purchase_state": requested} | extra
        if error_msg is not None:
            params["error_msg"] = error_msg
        answer = self.call(who, "purchase.fulfill", params)
        purchase = self.shop.visible_to(who, purchase_id)
        if who.scope is None:
            self.refused(answer, "fulfill", UNAUTHENTICATED)
        elif (
            not ACCEPTED_PURCHASE_ID.fullmatch(purchase_id)
            or requested not in REQUESTABLE
            or (error_msg is not None and len(error_msg) > MAX_ERROR_MSG)
            or misshapen_proof
        ):
            self.refused(answer, "fulfill", INVALID_PARAMS)
        elif error_msg is not None and not error_msg.isprintable():
            self.refused(answer, "fulfill", INVALID_PARAMS, name=" not printable")
        elif purchase is None:
            self.refused(answer, "fulfill", NOT_FOUND, {"purchase_id": purchase_id})
        elif (step := STATE_TABLE[(purchase.state, requested)]) == REFUSE:
            self.refused(
                answer,
                "fulfill",
                CONFLICT,
                {"current_state": purchase.state, "requested_state": requested},
            )
        elif step == REPEAT:
            # No evidence needed, whatever the proof: the answer is the one before.
            assert result_of(answer) == {
                "redirect_url": redirect_url(purchase),
                "purchase": purchase.shown,
            }, "a repeat answers exactly as before"
            self.outcome(f"fulfill {purchase.state} again" + (" with proof" if event else ""))
        elif event is not None:
            reason = event.refusal or self.fit(event, purchase, requested)
            if reason is not None:
                self.not_verified(answer, reason)
            else:
                self.applied_rpc(purchase, who, requested, error_msg, answer, PAYMENT_EVENT, event)
        else:
            needed = EVIDENCE_TABLE[(who.scope, requested)]
            if needed == "proof":
                self.not_verified(answer, "missing")
            else:
                evidence = None
                if requested == "fulfilled":
                    evidence = STAFF_COMP if needed == "proof_or_comp" else PAYMENTS_SCOPE
                self.applied_rpc(purchase, who, requested, error_msg, answer, evidence, None)

    def applied_rpc(
        self,
        purchase: ModelPurchase,
        who: Caller,
        requested: str,
        error_msg: str | None,
        answer: dict[str, Any],
        evidence: str | None,
        event: SentEvent | None,
    ) -> None:
        got = result_of(answer)
        before = purchase.shown
        shown = got["purchase"]
        self.apply(purchase, requested, failure_message(requested, error_msg, event), event)
        assert got == {
            "redirect_url": redirect_url(purchase),
            "purchase": {
                **before,
                "state": requested,
                "error_msg": purchase.error_msg,
                "updated_at": shown["updated_at"],
                "fulfilled_at": shown["updated_at"] if requested == "fulfilled" else None,
            },
        }
        assert at(shown["updated_at"]) >= at(before["updated_at"])
        self.record(purchase, before, shown, who, "rpc", evidence, event)
        role = "owner" if who.name == purchase.owner else who.scope
        self.outcome(f"fulfill {requested} by {role}" + (f" ({evidence})" if evidence else ""))

    def apply(
        self,
        purchase: ModelPurchase,
        requested: str,
        error_msg: str | None,
        event: SentEvent | None,
    ) -> None:
        purchase.state = requested
        purchase.error_msg = error_msg
        if requested == "fulfilled":
            self.shop.fulfilled.append(purchase)
            if event is not None:
                purchase.payment_ref = event.payment_ref
                self.shop.refs[event.payment_ref] = purchase.purchase_id

    def record(
        self,
        purchase: ModelPurchase,
        before: dict[str, Any],
        shown: dict[str, Any],
        who: Caller | None,
        source: str,
        evidence: str | None,
        event: SentEvent | None,
    ) -> None:
        """Take the purchase as shown after a change and the change's history row."""
        purchase.shown = shown
        self.shop.events.append(
            ModelEvent(
                purchase_id=purchase.purchase_id,
                from_state=before["state"],
                to_state=purchase.state,
                actor=None if who is None else who.name,
                actor_scope=None if who is None else who.scope,
                source=source,
                evidence=evidence,
                payment_event_id=None if event is None else event.event_id,
                payment_ref=None if event is None else event.payment_ref,
                error_msg=purchase.error_msg,
                created_at=shown["updated_at"],
            )
        )
        if event is not None:
            self.shop.applied_event_ids.add(event.event_id)

    # -- rules: the webhook --

    @rule(
        purchase_id=purchases,
        open_first=st.booleans(),
        outcome=st.sampled_from((SUCCEEDED,) * 3 + (FAILED,)),
        spec=PROOF_SPECS,
        other=purchases,
        replay=st.none() | st.none() | EVENT_PICKS,
    )
    def deliver(
        self,
        purchase_id: str,
        open_first: bool,
        outcome: str,
        spec: ProofSpec,
        other: str,
        replay: int | None,
    ) -> None:
        """The payment provider posts a new signed event, or retries one sent before
        (as a proof or a delivery)."""
        if replay is not None and self.shop.sent:
            self.outcome("webhook replay")
            self.delivered(self.shop.sent[replay % len(self.shop.sent)])
        else:
            purchase_id = self.steered(purchase_id, open_first)
            self.delivered(self.new_event(spec, purchase_id, outcome, other))

    def delivered(self, event: SentEvent) -> None:
        self.service.tally.steps += 1
        status, body = self.service.client.deliver(event)
        purchase = self.shop.purchases.get(event.purchase_id)
        if event.refusal is not None:
            assert status == WEBHOOK_STATUS[event.refusal], (status, body)
            self.webhook_refused(body, "error", event.refusal)
            return
        assert status == 200, (status, body)
        if purchase is None:
            self.webhook_refused(body, "refused", "mismatch")
            return
        requested = event.requested_state
        if event.event_id in self.shop.applied_event_ids:
            result = "duplicate"
        elif (step := STATE_TABLE[(purchase.state, requested)]) == REFUSE:
            result = "conflict"
        elif step == REPEAT:
            result = "repeated"
        elif (reason := self.fit(event, purchase, requested)) is not None:
            self.webhook_refused(body, "refused", reason)
            return
        else:
            before = purchase.shown
            self.apply(purchase, requested, failure_message(requested, None, event), event)
            shown = self.refreshed(purchase, before)
            self.record(purchase, before, shown, None, "webhook", PAYMENT_EVENT, event)
            result = "applied"
        assert body == {
            "status": result, "purchase_id": purchase.purchase_id, "state": purchase.state
        }, body  # fmt: skip
        self.outcome(f"webhook {result}" + (f" {requested}" if result == "applied" else ""))

    def webhook_refused(self, body: dict[str, Any], status: str, reason: str) -> None:
        assert set(body) == {"status", "reason", "message"}, body
        assert body["status"] == status and body["reason"] == reason, (status, reason, body)
        assert isinstance(body["message"], str) and body["message"], body
        self.outcome(f"webhook {status} {reason}")

    def refreshed(self, purchase: ModelPurchase, before: dict[str, Any]) -> dict[str, Any]:
        """The purchase as the server shows it after a webhook changed it (the webhook's
        answer has no times), read by the payment backend."""
        answer = self.call(
            self.caller_named("payments"), "purchase.get", {"purchase_id": purchase.purchase_id}
        )
        shown: dict[str, Any] = result_of(answer)
        assert shown == {
            **before,
            "state": purchase.state,
            "error_msg": purchase.error_msg,
            "updated_at": shown["updated_at"],
            "fulfilled_at": shown["updated_at"] if purchase.state == "fulfilled" else None,
        }, shown
        assert at(shown["updated_at"]) >= at(before["updated_at"])
        return shown

    # -- rules: reads --

    @rule(
        what=st.sampled_from(READS),
        caller=CALLERS,
        purchase_id=purchases | UNKNOWN_PURCHASE_IDS,
        state=LIST_STATES,
        limit=LIMITS,
    )
    def read(
        self, what: str, caller: str, purchase_id: str, state: str | None, limit: int | None
    ) -> None:
        """One purchase or its history; the caller's purchases (page by page) or
        registrations."""
        if what == "purchase.get":
            self.get(purchase_id, caller)
        elif what == "purchase.events":
            self.events(purchase_id, caller)
        elif what == "purchase.list":
            self.list_purchases(caller, state, limit)
        else:
            self.registrations(caller)

    def get(self, purchase_id: str, caller: str) -> None:
        who = self.step(caller)
        answer = self.call(who, "purchase.get", {"purchase_id": purchase_id})
        purchase = self.shop.visible_to(who, purchase_id)
        if who.email is None:
            self.refused(answer, "get", UNAUTHENTICATED)
        elif not ACCEPTED_PURCHASE_ID.fullmatch(purchase_id):
            self.refused(answer, "get", INVALID_PARAMS)
        elif purchase is None:
            self.refused(answer, "get", NOT_FOUND, {"purchase_id": purchase_id})
        else:
            assert result_of(answer) == purchase.shown
            self.outcome("get found")

    def events(self, purchase_id: str, caller: str) -> None:
        who = self.step(caller)
        answer = self.call(who, "purchase.events", {"purchase_id": purchase_id})
        purchase = self.shop.visible_to(who, purchase_id)
        if who.email is None:
            self.refused(answer, "events", UNAUTHENTICATED)
        elif not ACCEPTED_PURCHASE_ID.fullmatch(purchase_id):
            self.refused(answer, "events", INVALID_PARAMS)
        elif purchase is None:
            self.refused(answer, "events", NOT_FOUND, {"purchase_id": purchase_id})
        else:
            expected = [
                {
                    "seq": self.seq_floor + 1 + position,
                    "purchase_id": event.purchase_id,
                    "from_state": event.from_state,
                    "to_state": event.to_state,
                    "actor_scope": event.actor_scope,
                    # Whose change it was: shown to staff and the payment backend, and
                    # to a buyer for their own changes.
                    "actor_email": (
                        self.email_of(event.actor)
                        if event.actor is not None
                        and (who.sees_every_purchase or event.actor == who.name)
                        else None
                    ),
                    "source": event.source,
                    "evidence": event.evidence,
                    "payment_ref": event.payment_ref,
                    "error_msg": event.error_msg,
                    "created_at": event.created_at,
                }
                for position, event in enumerate(self.shop.events)
                if event.purchase_id == purchase_id
            ]
            assert result_of(answer) == expected
            self.outcome(f"events {'by owner' if who.name == purchase.owner else who.scope}")

    def list_purchases(self, caller: str, state: str | None, limit: int | None) -> None:
        who = self.step(caller)
        expected = [
            purchase.shown
            for purchase in reversed(self.shop.purchases.values())
            if self.shop.visible_to(who, purchase.purchase_id)
            and (state is None or purchase.state == state)
        ]
        params: dict[str, Any] = {}
        if state is not None:
            params["state"] = state
        if limit is not None:
            params["limit"] = limit
        pages: list[list[dict[str, Any]]] = []
        while True:
            answer = self.call(who, "purchase.list", params)
            if who.email is None:
                self.refused(answer, "list", UNAUTHENTICATED)
                return
            page = result_of(answer)
            assert set(page) == {"items", "next_cursor"}, page
            pages.append(page["items"])
            if page["next_cursor"] is None:
                break
            assert len(pages) <= len(expected), "next_cursor after the last purchase"
            params["cursor"] = page["next_cursor"]
        size = DEFAULT_LIMIT if limit is None else limit
        assert all(len(items) == size for items in pages[:-1]), "only the last page is short"
        assert len(pages[-1]) <= size and (pages[-1] or len(pages) == 1), "no empty last page"
        assert [item for items in pages for item in items] == expected
        self.outcome(f"list {len(pages)} page(s)" if len(pages) < 3 else "list 3+ pages")

    def registrations(self, caller: str) -> None:
        who = self.step(caller)
        answer = self.call(who, "registration.list", {})
        if who.email is None:
            self.refused(answer, "registration.list", UNAUTHENTICATED)
            return
        # The buyer's, newest first, whoever fulfilled the purchase.
        assert result_of(answer) == [
            {
                "course": purchase.course,
                "purchase_id": purchase.purchase_id,
                "created_at": purchase.shown["fulfilled_at"],
            }
            for purchase in reversed(self.shop.fulfilled)
            if purchase.owner == caller
        ]
        self.outcome("registration.list")

    # -- the tour: one scripted example through every outcome --

    def expect(self, outcome: str, action: Callable[..., T], *args: Any) -> T:
        """Run one step of the tour, check that it ended in ``outcome`` (the model
        checked the answer on the way), then check the database."""
        before = self.service.tally.outcomes.copy()
        result = action(*args)
        new = self.service.tally.outcomes - before
        assert new[outcome] == 1, f"expected {outcome!r}, got {dict(new)}"
        self.the_database_agrees()
        return result

    def tour(self) -> None:
        """Reach, in order, every answer the model knows, so that no strategy tuning can
        lose one: each refusal reason of a proof and of a delivery, each kind of
        evidence, repeats, conflicts, replays and reads."""
        expect = self.expect

        def create(caller: str, course: str, key: str | None) -> str:
            purchase_id = self.create_one(caller, course, key)
            assert purchase_id is not None
            return purchase_id

        def faults(*names: str) -> ProofSpec:
            return ProofSpec(frozenset(names), "card declined", 0)

        def pay(pid: str, by: str, proof: str = "new", spec: ProofSpec = FAULTLESS) -> None:
            self.fulfill(pid, by, "fulfilled", None, proof, spec, 0, other)

        def give_up(pid: str, by: str, requested: str, proof: str = "none") -> None:
            self.fulfill(pid, by, requested, "declined", proof, faults(), 0, pid)

        def deliver(pid: str, outcome: str = SUCCEEDED, spec: ProofSpec = FAULTLESS) -> SentEvent:
            event = self.new_event(spec, pid, outcome, other)
            self.delivered(event)
            return event

        alice = expect("create new", create, "alice", "python-basics", "order-1")
        alice_sql = expect("create new", create, "alice", "sql-fundamentals", None)
        other = expect("create new", create, "bob", "python-basics", None)
        bob_http = expect("create new", create, "bob", "http-apis", None)
        bob_sql = expect("create new", create, "bob", "sql-fundamentals", None)
        theirs = expect("create new", create, "payments", "python-basics", None)
        expect("fulfill 402 missing", pay, alice, "owner", "none")
        for fault, reason in (
            ("malformed_signature", "malformed"), ("expired", "expired"),
            ("future", "expired"), ("wrong_key", "invalid_signature"),
            ("tampered_payload", "invalid_signature"), ("reserialized", "invalid_signature"),
            ("tampered_id", "invalid_signature"), ("tampered_timestamp", "invalid_signature"),
            ("other_purchase", "mismatch"), ("unknown_purchase", "mismatch"),
            ("wrong_amount", "mismatch"), ("wrong_currency", "mismatch"),
            ("wrong_outcome", "mismatch"),
        ):  # fmt: skip
            expect(f"fulfill 402 {reason}", pay, alice, "owner", "new", faults(fault))
        expect("fulfill fulfilled by owner (payment_event)", pay, alice, "owner")
        expect("fulfill fulfilled again", pay, alice, "owner", "none")
        expect(
            "fulfill fulfilled again with proof", pay, alice, "owner", "new", faults("wrong_key")
        )
        expect("create 409 registered", self.create_one, "alice", "python-basics", None)
        expect("create replayed", self.create_one, "alice", "python-basics", "order-1")
        expect(f"create {CONFLICT}", self.create_one, "alice", "sql-fundamentals", "order-1")
        expect("fulfill 402 reused", pay, other, "owner", "new", faults("reused_ref"))
        expect("fulfill fulfilled by staff (staff_comp)", pay, other, "staff", "none")
        expect("fulfill fulfilled by payments (payments_scope)", pay, bob_http, "payments", "none")
        expect(f"fulfill {CONFLICT}", give_up, bob_http, "owner", "canceled")
        expect(
            "fulfill failed by owner (payment_event)", give_up, alice_sql, "owner", "failed", "new"
        )
        expect("fulfill failed again", give_up, alice_sql, "owner", "failed")
        paid = expect("webhook applied fulfilled", deliver, alice_sql)
        expect("webhook duplicate", self.delivered, paid)
        expect("webhook repeated", deliver, alice_sql)
        expect("fulfill canceled by owner", give_up, bob_sql, "owner", "canceled")
        expect("fulfill canceled again", give_up, bob_sql, "owner", "canceled")
        expect("webhook conflict", deliver, bob_sql)
        expect("webhook refused reused", deliver, theirs, SUCCEEDED, faults("reused_ref"))
        expect("webhook refused mismatch", deliver, theirs, SUCCEEDED, faults("wrong_amount"))
        expect("webhook refused mismatch", deliver, theirs, SUCCEEDED, faults("unknown_purchase"))
        for fault, reason in (
            ("malformed_signature", "malformed"), ("future", "expired"),
            ("wrong_key", "invalid_signature"),
        ):  # fmt: skip
            expect(f"webhook error {reason}", deliver, theirs, SUCCEEDED, faults(fault))
        expect("webhook applied failed", deliver, theirs, FAILED)
        expect("fulfill fulfilled by staff (payment_event)", pay, theirs, "staff")
        expect("events by owner", self.events, alice, "alice")
        expect("events staff", self.events, other, "staff")
        expect("events payments", self.events, bob_http, "payments")
        expect(f"events {NOT_FOUND}", self.events, alice, "bob")
        expect(f"events {UNAUTHENTICATED}", self.events, alice, "stranger")
        expect("get found", self.get, theirs, "payments")
        expect(f"get {NOT_FOUND}", self.get, theirs, "alice")
        expect("list 3+ pages", self.list_purchases, "staff", None, 1)
        expect("registration.list", self.registrations, "bob")
        fulfill_anything = self.fulfill_anything
        expect(f"fulfill {UNAUTHENTICATED}", fulfill_anything, bob_sql, "stranger",
               "failed", None, "none", FAULTLESS, "")  # fmt: skip
        expect(f"fulfill {INVALID_PARAMS}", fulfill_anything, bob_sql, "bob", "failed",
               None, "shape", FAULTLESS, "timestamp_as_string")  # fmt: skip
        expect(f"fulfill {INVALID_PARAMS} not printable", fulfill_anything, bob_sql, "bob",
               "failed", "line\nbreak", "none", FAULTLESS, "")  # fmt: skip
        expect(f"fulfill {NOT_FOUND}", fulfill_anything, bob_sql, "alice", "canceled", None,
               "none", FAULTLESS, "")  # fmt: skip

    # -- invariants, on the database itself --

    @invariant()
    def the_database_agrees(self) -> None:
        snapshot = self.service.database.snapshot()
        self.check_purchases(snapshot)
        self.check_history(snapshot)
        self.check_sequence(snapshot)
        self.check_every_fulfilment_is_backed(snapshot)
        self.check_histories_are_chains(snapshot)
        self.check_side_effects(snapshot)
        self.service.tally.invariant_checks += 1

    def check_purchases(self, snapshot: Snapshot) -> None:
        """Every purchase row is the model's (so a refused call changed none)."""
        rows = [
            (pid, email, slug, state, error_msg, key, ref, moment(created), moment(updated),
             moment(fulfilled))
            for (pid, email, slug, state, error_msg, key, ref, created, updated, fulfilled)
            in snapshot.purchases
        ]  # fmt: skip
        expected = [
            (p.purchase_id, self.email_of(p.owner), p.course, p.state, p.error_msg,
             p.idempotency_key, p.payment_ref, moment(p.shown["created_at"]),
             moment(p.shown["updated_at"]), moment(p.shown["fulfilled_at"]))
            for p in self.shop.purchases.values()
        ]  # fmt: skip
        assert sorted(rows, key=repr) == sorted(expected, key=repr), "purchases in the database"

    def check_history(self, snapshot: Snapshot) -> None:
        """The history rows are the model's, one per state change, in order."""
        rows = [
            (pid, from_state, to_state, email, scope, source, evidence, event_id, ref, msg,
             moment(created))
            for (_seq, pid, from_state, to_state, email, scope, source, evidence, event_id,
                 ref, msg, created) in snapshot.events
        ]  # fmt: skip
        expected = [
            (e.purchase_id, e.from_state, e.to_state,
             None if e.actor is None else self.email_of(e.actor), e.actor_scope, e.source,
             e.evidence, e.payment_event_id, e.payment_ref, e.error_msg, moment(e.created_at))
            for e in self.shop.events
        ]  # fmt: skip
        assert rows == expected, "purchase_events: one row per state change, in order"

    def check_sequence(self, snapshot: Snapshot) -> None:
        """seq increases by one per event, from where the last example left off."""
        seqs = [row[0] for row in snapshot.events]
        assert seqs == list(range(self.seq_floor + 1, self.seq_floor + 1 + len(seqs))), seqs
        assert snapshot.last_seq == self.seq_floor + len(seqs), (snapshot.last_seq, seqs)

    def check_every_fulfilment_is_backed(self, snapshot: Snapshot) -> None:
        """Nothing is fulfilled without a payment event (whose payment_ref fulfilled no
        other purchase), the payment backend's word, or a staff comp."""
        refs = [row[6] for row in snapshot.purchases if row[6] is not None]
        assert len(refs) == len(set(refs)), f"a payment_ref fulfilled two purchases: {refs}"
        fulfilled_events = defaultdict(list)
        for row in snapshot.events:
            if row[3] == "fulfilled":
                fulfilled_events[row[1]].append(row)
        for pid, _email, _slug, state, _msg, _key, ref, *_times in snapshot.purchases:
            found = fulfilled_events.get(pid, [])
            if state != "fulfilled":
                assert not found and ref is None, (pid, state, ref, found)
                continue
            assert len(found) == 1, f"{pid} fulfilled by {len(found)} events"
            (_seq, _pid, _from, _to, _email, scope, source, evidence, event_id, event_ref,
             _msg, _created) = found[0]  # fmt: skip
            if evidence == PAYMENT_EVENT:
                assert event_id is not None and event_ref is not None and event_ref == ref
                assert (scope is None) == (source == "webhook"), found
            elif evidence == PAYMENTS_SCOPE:
                assert scope == "payments" and ref is None and event_id is None, found
            else:
                assert evidence == STAFF_COMP and scope == "staff", f"unbacked: {found}"
                assert ref is None and event_id is None, found
        for row in snapshot.events:
            if row[3] != "fulfilled":
                # Other changes need no evidence; a payment.failed event may back one.
                assert row[7] is None or (row[7] == PAYMENT_EVENT and row[3] == "failed"), row

    def check_histories_are_chains(self, snapshot: Snapshot) -> None:
        """Each purchase's events: created (NULL to pending), then each from the state
        the previous one left, never to the same state, ending in the current state."""
        histories = defaultdict(list)
        for row in snapshot.events:
            histories[row[1]].append((row[2], row[3]))
        states = {row[0]: row[3] for row in snapshot.purchases}
        assert set(histories) == set(states), "every purchase has a history, and only they"
        for pid, history in histories.items():
            assert history[0] == (None, "pending"), (pid, history)
            for (_, previous_to), (from_state, to_state) in pairwise(history):
                assert from_state == previous_to and to_state != from_state, (pid, history)
            assert history[-1][1] == states[pid], (pid, history, states[pid])

    def check_side_effects(self, snapshot: Snapshot) -> None:
        """One registration (the owner's, for the course) and one receipt row (to the
        owner) per fulfilled purchase, none for any other."""
        owners = {row[0]: (row[1], row[2], row[3]) for row in snapshot.purchases}
        fulfilled = sorted(
            (pid, email, slug) for pid, (email, slug, state) in owners.items()
            if state == "fulfilled"
        )  # fmt: skip
        assert sorted(snapshot.registrations) == fulfilled, "registrations"
        assert sorted(snapshot.receipts) == [(pid, email) for pid, email, _ in fulfilled]
        expected = [(p.purchase_id, self.email_of(p.owner), p.course) for p in self.shop.fulfilled]
        assert sorted(snapshot.registrations) == sorted(expected), "the model's registrations"


# --- the test ---------------------------------------------------------------------------

# Outcomes the random examples must reach on their own, each about ten times or more
# (the tour reaches all of these and the rarer ones), or they explore less than they
# claim.
REQUIRED_OUTCOMES = {
    "create new", "create replayed", f"create {CONFLICT}", f"create {CONFLICT} registered",
    f"create {NOT_FOUND}", f"create {INVALID_PARAMS}", f"create {UNAUTHENTICATED}",
    f"fulfill fulfilled by owner ({PAYMENT_EVENT})",
    f"fulfill fulfilled by payments ({PAYMENTS_SCOPE})",
    f"fulfill failed by owner ({PAYMENT_EVENT})", "fulfill failed by owner",
    "fulfill canceled by owner", "fulfill canceled by staff",
    "fulfill fulfilled again", "fulfill fulfilled again with proof", "fulfill failed again",
    "fulfill canceled again",
    *(f"fulfill {PAYMENT_NOT_VERIFIED} {reason}"
      for reason in ("missing", "invalid_signature", "expired", "mismatch", "reused")),
    f"fulfill {CONFLICT}", f"fulfill {NOT_FOUND}", f"fulfill {INVALID_PARAMS}",
    f"fulfill {INVALID_PARAMS} not printable", f"fulfill {UNAUTHENTICATED}",
    "proof sent before", "webhook applied fulfilled", "webhook repeated", "webhook replay",
    "webhook refused mismatch", "webhook error invalid_signature", "webhook error expired",
    "get found", f"get {NOT_FOUND}", "events by owner", f"events {NOT_FOUND}",
    "list 1 page(s)", "registration.list",
}  # fmt: skip


async def test_random_call_sequences_agree_with_the_model(
    backend: str,
    database_url: str,
    engine: AsyncEngine,
    uow_factory: SqlUnitOfWorkFactory,
    world: World,
    tmp_path: Path,
) -> None:
    await services.save_course(
        uow_factory, slug="http-apis", title="HTTP APIs",
        price=Decimal(COURSES["http-apis"][0]), currency=COURSES["http-apis"][1],
    )  # fmt: skip
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_FRONTEND_URL": FRONTEND_URL,
        "RPC_SERVER_RATE_LIMIT": "0",  # thousands of calls per token; not what is tested
        "RPC_SERVER_ANONYMOUS_RATE_LIMIT": "0",  # the stranger's calls, likewise
        "RPC_SERVER_MAX_PENDING_PURCHASES": "1000000",  # open purchases pile up; likewise
        "RPC_SERVER_PAYMENT_KEYS": TEST_PAYMENT_KEY,
    }
    callers = {
        "alice": Caller("alice", world.alice.token, world.alice.email, "buyer"),
        "bob": Caller("bob", world.bob.token, world.bob.email, "buyer"),
        "staff": Caller("staff", world.staff.token, world.staff.email, "staff"),
        "payments": Caller("payments", world.payments.token, world.payments.email, "payments"),
        "stranger": Caller("stranger", "not-a-token", None),
    }
    database = Database(engine, asyncio.get_running_loop())
    tour_tally, tally = Tally(), Tally()
    run_settings = hypothesis_settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    def bound(name: str, client: RpcClient, tally: Tally) -> type[ShopMachine]:
        return type(name, (ShopMachine,), {"service": Service(client, database, callers, tally)})

    def drive() -> RpcClient:
        with running_server(env, cwd=tmp_path) as (port, _server):
            client = RpcClient(f"http://127.0.0.1:{port}")
            tour = bound("Tour", client, tour_tally)()
            tour.tour()
            tour.teardown()
            run_state_machine_as_test(bound("Shop", client, tally), settings=run_settings)
        return client

    # The machine blocks on HTTP and hands its queries to this loop, so it runs aside.
    client = await asyncio.to_thread(drive)

    print(
        f"model-based [{backend}]: the tour: {tour_tally.steps} steps, "
        f"{len(tour_tally.outcomes)} outcomes; {tally.examples} examples, {tally.steps} steps, "
        f"{client.calls} calls, {client.deliveries} webhook deliveries, "
        f"{tally.invariant_checks} invariant checks ({database.snapshots} snapshots); "
        f"outcomes: {dict(sorted(tally.outcomes.items()))}"
    )
    assert set(tally.outcomes) >= REQUIRED_OUTCOMES, REQUIRED_OUTCOMES - set(tally.outcomes)
