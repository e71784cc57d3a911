"""Model-based: random call sequences against a real server agree with a model of the shop.

A Hypothesis ``RuleBasedStateMachine`` drives one real ``rpc-server serve`` process
(``tests.processes.running_server``) on the test's own database, SQLite and PostgreSQL,
over plain HTTP (``urllib``: synchronous, so the machine stays synchronous) with random
sequences of ``purchase.create``, ``purchase.fulfill``, ``purchase.get``,
``purchase.list`` (following ``next_cursor`` to the last page) and
``registration.list``, called by alice, bob, the staff support desk and a stranger whose
token is unknown. A small in-memory model predicts every answer: the purchases (owner,
course, state, error_msg, how the server shows them, the last answer that changed them),
the idempotency keys per (user, key), the fulfillment state table, who may see what,
and each user's registrations. After every call the machine checks the whole result, or
the error code and data, against the prediction; its invariants look into the database
itself: exactly one registration (the buyer's) and one receipt outbox row (to the buyer)
per fulfilled purchase and none for any other, and every purchase's owner, course,
state, error_msg and idempotency key as the model has them.

Each example starts from an empty shop: the machine deletes the purchases, registrations
and receipts, keeping users, tokens and courses. The server is idle between examples and
keeps nothing about purchases in memory (the rate limiter, which keeps counts, is off),
so every example, and the minimal failing one Hypothesis prints, stands alone.

A NUL character in a string param is an invalid param (-32602) on both engines
(PostgreSQL ``text`` cannot hold one); an internal error is never right.

The examples are derandomized (the same on every run) and no example database is kept.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
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
from sqlalchemy.ext.asyncio import AsyncEngine

from rpc_server.database import SQLITE_IMMEDIATE
from tests.conftest import FRONTEND_URL, World
from tests.processes import running_server

T = TypeVar("T")

# Examples per run (on each engine) and the most steps in one.
EXAMPLES = 60
STEPS = 40

UNAUTHENTICATED, NOT_FOUND, CONFLICT, INVALID_PARAMS = 401, 404, 409, -32602

# The model of the shop, written from the README (not imported from the server).
COURSES = {"python-basics": ("49.00", "USD"), "sql-fundamentals": ("39.50", "EUR")}
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
NEW_PURCHASE_ID = re.compile(r"[0-9a-f]{32}")
ACCEPTED_PURCHASE_ID = re.compile(r"[0-9a-z]{1,64}")  # what purchase_id params may look like
MAX_ERROR_MSG = 1000
DEFAULT_LIMIT = 20

# Repeated values weigh the draws: one call in ten is the stranger's, one purchase in
# five is of a course that does not exist.
CALLERS = st.sampled_from(("alice",) * 3 + ("bob",) * 3 + ("staff",) * 3 + ("stranger",))
COURSE_SLUGS = st.sampled_from((*COURSES,) * 2 + (UNKNOWN_COURSE,))
# A small pool, so replays and reuse for another course happen; the last three are
# invalid (a NUL character, empty, too long).
IDEMPOTENCY_KEYS = st.none() | st.sampled_from(
    ("order-1", "order-2") * 3 + ("k" * 64, "clé-ü", "nul\x00", "", "k" * 65)
)
ORDERS = st.tuples(CALLERS, COURSE_SLUGS, IDEMPOTENCY_KEYS)
ERROR_MSGS = (
    st.none()
    | st.sampled_from(("card declined", "declined\x00", "", "x" * MAX_ERROR_MSG))
    | st.text(max_size=20)
)
# For the rules that also try what the server must refuse as invalid params.
ANY_REQUESTED_STATE = st.sampled_from(STATES)  # pending cannot be requested
ANY_ERROR_MSG = ERROR_MSGS | st.just("x" * (MAX_ERROR_MSG + 1))
# Ids the model never saw: well-formed ones (404) and malformed ones (invalid params).
UNKNOWN_PURCHASE_IDS = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32) | (
    st.sampled_from(("zzzz", "NOT-AN-ID", "z" * 65))
)
LIST_STATES = st.none() | st.sampled_from(STATES)
LIMITS = st.sampled_from((None, 1, 2, 3))  # None: the default, 20


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    token: str
    email: str | None  # None: the token belongs to nobody
    is_staff: bool = False


@dataclass
class ModelPurchase:
    purchase_id: str
    owner: str
    course: str
    idempotency_key: str | None
    shown: dict[str, Any]  # the purchase as every answer must show it now
    state: str = "pending"
    error_msg: str | None = None
    answer: dict[str, Any] | None = None  # the purchase.fulfill answer that last changed it


@dataclass
class Shop:
    purchases: dict[str, ModelPurchase] = field(default_factory=dict)  # in creation order
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, key) -> id
    fulfilled: list[ModelPurchase] = field(default_factory=list)  # in fulfillment order

    def visible_to(self, caller: Caller, purchase_id: str) -> ModelPurchase | None:
        purchase = self.purchases.get(purchase_id)
        if purchase is None or not (caller.is_staff or purchase.owner == caller.name):
            return None
        return purchase


def redirect_url(purchase: ModelPurchase) -> str:
    if purchase.state == "fulfilled":
        return f"{FRONTEND_URL}/courses/{purchase.course}/start"
    if purchase.state == "failed":
        return f"{FRONTEND_URL}/checkout/{purchase.purchase_id}"
    return f"{FRONTEND_URL}/courses/{purchase.course}"


def has_nul(value: str | None) -> bool:
    return value is not None and "\x00" in value


def is_error(answer: dict[str, Any], code: int) -> bool:
    return "error" in answer and answer["error"].get("code") == code


def result_of(answer: dict[str, Any]) -> Any:
    assert "error" not in answer, f"expected a result, got {answer}"
    return answer["result"]


def timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- the real service -------------------------------------------------------------------


class RpcClient:
    """One JSON-RPC call per HTTP request, synchronously; counts the calls."""

    def __init__(self, url: str):
        self.url = url
        self.calls = 0

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


class Database:
    """The server's database as the invariants see it, from the machine's thread.

    The engine belongs to the test's event loop, which waits in ``asyncio.to_thread``
    while the machine runs; each query is handed to that loop.
    """

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.queries = 0

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        async def fetch() -> list[tuple[Any, ...]]:
            async with self.engine.connect() as connection:
                return [tuple(row) for row in await connection.execute(text(sql))]

        self.queries += 1
        return self._run(fetch())

    def empty_shop(self) -> None:
        """Delete every purchase with its registration and receipt."""

        async def delete() -> None:
            writer = self.engine.execution_options(**{SQLITE_IMMEDIATE: True})
            async with writer.begin() as connection:
                for table in ("receipt_outbox", "course_registrations", "purchases"):
                    await connection.execute(text(f"DELETE FROM {table}"))

        self._run(delete())


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
        self.service.database.empty_shop()
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

    def refused(self, answer: dict[str, Any], method: str, code: int, data: Any = None) -> None:
        """Check that the call was answered with error ``code`` (and ``data``, if given)."""
        assert "result" not in answer and is_error(answer, code), f"expected {code}: {answer}"
        if data is not None:
            assert answer["error"].get("data") == data, answer
        self.outcome(f"{method} {code}")

    def email_of(self, name: str) -> str:
        email = self.service.callers[name].email
        assert email is not None
        return email

    # -- rules --

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
        elif has_nul(key):
            self.refused(answer, "create", INVALID_PARAMS)
            self.outcome("create NUL refused")
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
        self.outcome("create new")
        return purchase_id

    @rule(
        purchase_id=purchases,
        by_staff=st.booleans(),
        requested=st.sampled_from(REQUESTABLE),
        error_msg=ERROR_MSGS,
    )
    def fulfill(
        self, purchase_id: str, by_staff: bool, requested: str, error_msg: str | None
    ) -> None:
        """The payment outcomes a shop sends: by the buyer or the support desk."""
        caller = "staff" if by_staff else self.shop.purchases[purchase_id].owner
        self.fulfill_anything(purchase_id, caller, requested, error_msg)

    @rule(
        purchase_id=purchases | UNKNOWN_PURCHASE_IDS,
        caller=CALLERS,
        requested=ANY_REQUESTED_STATE,
        error_msg=ANY_ERROR_MSG,
    )
    def fulfill_anything(
        self, purchase_id: str, caller: str, requested: str, error_msg: str | None
    ) -> None:
        who = self.step(caller)
        params = {"purchase_id": purchase_id, "purchase_state": requested}
        if error_msg is not None:
            params["error_msg"] = error_msg
        answer = self.call(who, "purchase.fulfill", params)
        purchase = self.shop.visible_to(who, purchase_id)
        if who.email is None:
            self.refused(answer, "fulfill", UNAUTHENTICATED)
        elif (
            not ACCEPTED_PURCHASE_ID.fullmatch(purchase_id)
            or requested not in REQUESTABLE
            or (error_msg is not None and len(error_msg) > MAX_ERROR_MSG)
        ):
            self.refused(answer, "fulfill", INVALID_PARAMS)
        elif has_nul(error_msg):
            self.refused(answer, "fulfill", INVALID_PARAMS)
            self.outcome("fulfill NUL refused")
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
            assert result_of(answer) == purchase.answer, "a repeat answers exactly as before"
            self.outcome(f"fulfill {purchase.state} again")
        else:
            self.applied(purchase, requested, error_msg, result_of(answer))
            self.outcome(
                f"fulfill {requested}" + (" by staff" if who.name != purchase.owner else "")
            )

    def applied(
        self, purchase: ModelPurchase, requested: str, error_msg: str | None, got: dict[str, Any]
    ) -> None:
        before = purchase.shown
        shown = got["purchase"]
        purchase.state = requested
        purchase.error_msg = error_msg if requested == "failed" else None
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
        assert timestamp(shown["updated_at"]) >= timestamp(before["updated_at"])
        purchase.shown, purchase.answer = shown, got
        if requested == "fulfilled":
            self.shop.fulfilled.append(purchase)

    @rule(purchase_id=purchases | UNKNOWN_PURCHASE_IDS, caller=CALLERS)
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

    @rule(caller=CALLERS, state=LIST_STATES, limit=LIMITS)
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

    @rule(caller=CALLERS)
    def registrations(self, caller: str) -> None:
        who = self.step(caller)
        answer = self.call(who, "registration.list", {})
        if who.email is None:
            self.refused(answer, "registration.list", UNAUTHENTICATED)
            return
        # The buyer's, newest first, even when staff fulfilled the purchase.
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

    # -- invariants, on the database itself --

    @invariant()
    def one_registration_per_fulfilled_purchase(self) -> None:
        rows = self.service.database.rows(
            "SELECT p.purchase_id, u.email, c.slug FROM course_registrations r "
            "JOIN purchases p ON p.id = r.purchase_id JOIN users u ON u.id = r.user_id "
            "JOIN courses c ON c.id = r.course_id"
        )
        expected = [(p.purchase_id, self.email_of(p.owner), p.course) for p in self.shop.fulfilled]
        assert sorted(rows) == sorted(expected), "registrations: the buyer's, one per fulfilled"
        self.service.tally.invariant_checks += 1

    @invariant()
    def one_receipt_per_fulfilled_purchase(self) -> None:
        rows = self.service.database.rows(
            "SELECT p.purchase_id, o.recipient FROM receipt_outbox o "
            "JOIN purchases p ON p.id = o.purchase_id"
        )
        expected = [(p.purchase_id, self.email_of(p.owner)) for p in self.shop.fulfilled]
        assert sorted(rows) == sorted(expected), "receipts: to the buyer, one per fulfilled"
        self.service.tally.invariant_checks += 1

    @invariant()
    def purchases_in_the_database_are_the_model(self) -> None:
        rows = self.service.database.rows(
            "SELECT p.purchase_id, u.email, c.slug, p.state, p.error_msg, p.idempotency_key "
            "FROM purchases p JOIN users u ON u.id = p.owner_id "
            "JOIN courses c ON c.id = p.course_id"
        )
        expected = [
            (p.purchase_id, self.email_of(p.owner), p.course, p.state, p.error_msg,
             p.idempotency_key)
            for p in self.shop.purchases.values()
        ]  # fmt: skip
        assert sorted(rows) == sorted(expected), "purchases in the database"
        self.service.tally.invariant_checks += 1


# --- the test ---------------------------------------------------------------------------

# Outcomes every run must have reached, or the model checked less than it claims.
REQUIRED_OUTCOMES = {
    "create new", "create replayed", f"create {CONFLICT}", f"create {NOT_FOUND}",
    f"create {INVALID_PARAMS}", f"create {UNAUTHENTICATED}",
    "fulfill fulfilled", "fulfill failed", "fulfill canceled", "fulfill fulfilled by staff",
    "fulfill fulfilled again", "fulfill failed again", "fulfill canceled again",
    f"fulfill {CONFLICT}", f"fulfill {NOT_FOUND}", f"fulfill {INVALID_PARAMS}",
    "get found", f"get {NOT_FOUND}", "list 1 page(s)", "list 3+ pages", "registration.list",
}  # fmt: skip


async def test_random_call_sequences_agree_with_the_model(
    backend: str, database_url: str, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    env = {
        "RPC_SERVER_DATABASE_URL": database_url,
        "RPC_SERVER_MAIL_DIR": str(tmp_path / "mail"),
        "RPC_SERVER_FRONTEND_URL": FRONTEND_URL,
        "RPC_SERVER_RATE_LIMIT": "0",  # thousands of calls per token; not what is tested
    }
    callers = {
        "alice": Caller("alice", world.alice.token, world.alice.email),
        "bob": Caller("bob", world.bob.token, world.bob.email),
        "staff": Caller("staff", world.staff.token, world.staff.email, is_staff=True),
        "stranger": Caller("stranger", "not-a-token", None),
    }
    database = Database(engine, asyncio.get_running_loop())
    tally = Tally()
    run_settings = hypothesis_settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    def drive() -> RpcClient:
        with running_server(env, cwd=tmp_path) as (port, _server):
            client = RpcClient(f"http://127.0.0.1:{port}/rpc")
            service = Service(client, database, callers, tally)
            machine = type("Shop", (ShopMachine,), {"service": service})
            run_state_machine_as_test(machine, settings=run_settings)
        return client

    # The machine blocks on HTTP and hands its queries to this loop, so it runs aside.
    client = await asyncio.to_thread(drive)

    print(
        f"model-based [{backend}]: {tally.examples} examples, {tally.steps} steps, "
        f"{client.calls} calls, {tally.invariant_checks} invariant checks "
        f"({database.queries} queries); outcomes: {dict(sorted(tally.outcomes.items()))}"
    )
    assert set(tally.outcomes) >= REQUIRED_OUTCOMES, REQUIRED_OUTCOMES - set(tally.outcomes)
