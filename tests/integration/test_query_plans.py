"""Every statement the repositories run on a hot path reads the index made for it, at
realistic sizes, on both engines: EXPLAIN of the very statement the server compiles and
binds (``tests/integration/plans.py``), on a database where one buyer has 100,000
purchases among others' (``plans.seed``).

Three databases: SQLite as a user has it (no statistics: nobody runs ANALYZE), SQLite
after ANALYZE (``PRAGMA optimize`` would write the same statistics, and they can flip a
plan), PostgreSQL after ANALYZE (autovacuum keeps statistics there). On PostgreSQL the
generic plan of a statement (built without its values, used after five runs of a
prepared statement whenever it looks no dearer than the custom ones: asyncpg prepares
every statement) is held to the same rules whenever PostgreSQL would switch to it.

The rules, per statement (``Case``): each large table is read only through the indexes
named for it (a search: the statement's conditions bound the range read), or walked in
order from one end only where a LIMIT stops the walk; never read whole; a page of rows
comes in order from its index, never sorted. So a lookup by id costs the same whatever
its caller owns, and a page the same however deep.

Covered elsewhere, not repeated here: PostgreSQL's plan of a buyer's ``purchase.list``
pages without a state (``test_keyset_paging.py``, which also pages through them all).
Not checked, by design: inserts (no read; their unique checks are index probes), the
event counter (one row), ``receipts.counts`` and ``courses.list_all`` (the operator's
count of every receipt and the whole catalogue: a full pass by definition), and the
rate limiter's purge of idle buckets (a pass over the table at most once a minute per
process; an index on ``updated_at`` would be rewritten by every request's take).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.sql import ClauseElement

from rpc_server.db.engines import open_engine
from rpc_server.db.repositories import courses, events, outbox, purchases, registrations, users
from rpc_server.db.repositories.rows import IDS_PER_STATEMENT
from rpc_server.db.stock_engine import stock_engine
from rpc_server.domain.states import PurchaseState
from rpc_server.jsonrpc import buckets
from tests import databases
from tests.conftest import AVAILABLE_BACKENDS, POSTGRES_ADMIN_URL, sqlite_url
from tests.integration import plans
from tests.integration.plans import Plan, Shape

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PAGE = 21  # a page of 20, and one more to know whether there is a next

# Tables small enough that a plan may read them as it likes when joining by key (a hash
# of a few thousand users instead of one lookup per row is PostgreSQL's fair choice);
# a case that names one of them holds it to the rules like any other.
SMALL_TABLES = frozenset({"users", "courses", "event_sequence"})


@dataclass(frozen=True)
class Case:
    """One statement, the values it runs with, and how its plan may read each table."""

    name: str
    statement: ClauseElement
    values: Callable[[Shape], dict[str, Any]]
    # table -> the indexes through which the statement may search it
    searches: Mapping[str, frozenset[str]]
    # table -> the indexes it may walk in order from one end (a LIMIT stops the walk)
    walks: Mapping[str, frozenset[str]] = field(default_factory=dict)
    page: bool = False  # its rows come in index order, never sorted
    engines: frozenset[str] = frozenset({"sqlite", "postgresql"})


def by(*indexes: str) -> frozenset[str]:
    return frozenset(indexes)


def _ids(count: int) -> Callable[[Shape], dict[str, Any]]:
    return lambda shape: {f"id_{n}": shape.purchase_ids[n % 50] for n in range(count)}


def _page_cases() -> list[Case]:
    """``purchase.list``: a buyer's own or (staff) everyone's, with or without a state,
    first page or below a cursor."""
    cases = []
    for of_owner in (True, False):
        for state in (None, PurchaseState.PENDING, PurchaseState.CANCELED):
            for before in (False, True):

                def values(
                    shape: Shape,
                    of_owner: bool = of_owner,
                    state: PurchaseState | None = state,
                    before: bool = before,
                ) -> dict[str, Any]:
                    found: dict[str, Any] = {"limit": PAGE}
                    if of_owner:
                        found["owner_id"] = shape.heavy
                    if state is not None:
                        found["state"] = state.value
                    if before:
                        found["before"] = shape.deep_cursor
                    return found

                whose = "own" if of_owner else "everyone's"
                which = f"{state.value} " if state is not None else ""
                name = (
                    f"purchases/page of {whose} {which}purchases, {'deep' if before else 'first'}"
                )
                statement = purchases._page_query(
                    of_owner=of_owner, in_state=state is not None, before=before
                )
                walks: dict[str, frozenset[str]] = {}
                engines = frozenset({"sqlite", "postgresql"})
                if of_owner and state is None:
                    # Below a cursor among the buyer's own purchases the primary key's range
                    # is as short. PostgreSQL: test_keyset_paging.py.
                    indexes = by("ix_purchases_owner_id_id", *(["pk_purchases"] if before else []))
                    engines = frozenset({"sqlite"})
                elif of_owner:
                    # The buyer's purchases in that state alone, never the others: a buyer
                    # with 100,000 purchases and a few canceled ones must not read them all.
                    indexes = by("ix_purchases_owner_id_state_id")
                    if state is PurchaseState.PENDING:
                        indexes |= by("ix_purchases_owner_id_pending")
                elif state is None:
                    indexes = by("pk_purchases")
                    walks = {"purchases": by("pk_purchases")}
                else:
                    # Everyone's purchases in one state (the support desk): in order, from
                    # an index of states, not by walking all purchases for the few canceled.
                    indexes = by("ix_purchases_state_id")
                cases.append(
                    Case(
                        name,
                        statement,
                        values,
                        {"purchases": indexes},
                        walks,
                        page=True,
                        engines=engines,
                    )
                )
    return cases


PURCHASE_BY_ID = by("uq_purchases_purchase_id")
CLAIM_TOKEN = by("ix_receipt_outbox_claim_token")

CASES: list[Case] = [
    # --- purchases: by id (purchase.get, single and batched), by key, by payment -------
    Case(
        "purchases/by id",
        purchases._PURCHASE_BY_ID,
        lambda shape: {"purchase_id": shape.purchase_id},
        {"purchases": PURCHASE_BY_ID},
    ),
    Case(
        "purchases/by id, own",
        purchases._OWN_PURCHASE_BY_ID,
        lambda shape: {"purchase_id": shape.purchase_id, "owner_id": shape.heavy},
        {"purchases": PURCHASE_BY_ID},
    ),
    *(
        Case(
            f"purchases/{count} by ids (a batch's coalesced reads)",
            purchases._purchases_by_ids(count),
            _ids(count),
            {"purchases": PURCHASE_BY_ID},
        )
        for count in (1, 50, IDS_PER_STATEMENT)
    ),
    Case(
        "purchases/by idempotency key",
        purchases._PURCHASE_BY_IDEMPOTENCY_KEY,
        lambda shape: {"owner_id": shape.heavy, "idempotency_key": shape.idempotency_key},
        {"purchases": by("uq_purchases_owner_id_idempotency_key")},
    ),
    Case(
        "purchases/holder of a payment reference",
        purchases._PURCHASE_BY_PAYMENT_REF,
        lambda shape: {"payment_ref": shape.payment_ref},
        {"purchases": by("uq_purchases_payment_ref")},
    ),
    Case(
        "purchases/transition",
        purchases._transition_statement(
            frozenset({PurchaseState.PENDING}), PurchaseState.FULFILLED
        ),
        lambda shape: {
            "pk": shape.purchase_pk,
            "new_error_msg": None,
            "now": NOW,
            "payment_ref": "pay-new",
        },
        {"purchases": by("pk_purchases")},
    ),
    Case(
        "purchases/count of open purchases",
        purchases._PENDING_OF_OWNER,
        lambda shape: {"owner_id": shape.heavy},
        {"purchases": by("ix_purchases_owner_id_pending", "ix_purchases_owner_id_state_id")},
    ),
    *_page_cases(),
    # --- registrations ------------------------------------------------------------------
    Case(
        "registrations/exists (purchase.create), for a course the buyer has none of",
        registrations._REGISTRATION_OF_USER_FOR_COURSE,
        lambda shape: {"user_id": shape.heavy, "course_id": shape.other_course},
        {"course_registrations": by("ix_course_registrations_user_id_course_id")},
    ),
    Case(
        "registrations/page, first",
        registrations.registration_page_query(before=False),
        lambda shape: {"user_id": shape.heavy, "limit": PAGE},
        {
            "course_registrations": by("ix_course_registrations_user_id_id"),
            "purchases": by("pk_purchases"),
        },
        page=True,
    ),
    Case(
        "registrations/page, deep",
        registrations.registration_page_query(before=True),
        lambda shape: {"user_id": shape.heavy, "limit": PAGE, "before": shape.registration_cursor},
        {
            "course_registrations": by(
                "ix_course_registrations_user_id_id", "pk_course_registrations"
            ),
            "purchases": by("pk_purchases"),
        },
        page=True,
    ),
    # --- the receipt outbox: the deliverer's claim, read-back, renewal, settling --------
    # The claim may sort the due rows it reads: PostgreSQL's index has no id to break ties
    # in due time (SQLite's ends with the rowid). With distinct due times it reads about
    # ``limit`` rows (an incremental sort); a backlog due at one instant is sorted whole.
    Case(
        "outbox/claim the due receipts",
        outbox._CLAIM_DUE,
        lambda shape: {
            "now": NOW,
            "limit": 50,
            "token": "a-new-claim",
            "lease_until": NOW + timedelta(minutes=5),
        },
        {"receipt_outbox": by("ix_receipt_outbox_status_next_attempt_at", "pk_receipt_outbox")},
    ),
    Case(
        "outbox/read back a claim",
        outbox._CLAIMED,
        lambda shape: {"token": shape.claim_token},
        {"receipt_outbox": CLAIM_TOKEN, "purchases": by("pk_purchases")},
    ),
    Case(
        "outbox/renew a claim's lease",
        outbox._RENEW,
        lambda shape: {"token": shape.claim_token, "lease_until": NOW + timedelta(minutes=5)},
        {"receipt_outbox": CLAIM_TOKEN},
    ),
    Case(
        "outbox/release a claim",
        outbox._RELEASE,
        lambda shape: {"token": shape.claim_token, "now": NOW},
        {"receipt_outbox": CLAIM_TOKEN},
    ),
    Case(
        "outbox/settle",
        outbox._SETTLE,
        lambda shape: {
            "outbox_id": shape.outbox_id,
            "token": "a-claim",
            "new_status": "sent",
            "sent": NOW,
            "next_attempt": None,
            "error": None,
        },
        # By key, or (PostgreSQL, with the claim's index) among the claim's few rows.
        {"receipt_outbox": by("pk_receipt_outbox", "ix_receipt_outbox_claim_token")},
    ),
    *(
        Case(
            f"outbox/settle {count} sent together",
            outbox._settle_sent(count),
            lambda shape, count=count: {
                **{f"id_{n}": shape.outbox_id + n for n in range(count)},
                "token": "a-claim",
                "now": NOW,
            },
            # By key, or (PostgreSQL, with the claim's index) among the claim's few rows.
            {"receipt_outbox": by("pk_receipt_outbox", "ix_receipt_outbox_claim_token")},
        )
        for count in (1, 50)
    ),
    Case(
        "outbox/requeue",
        outbox._REQUEUE,
        lambda shape: {"outbox_id": shape.outbox_id, "now": NOW},
        {"receipt_outbox": by("pk_receipt_outbox")},
    ),
    Case(
        "outbox/status of one",
        outbox._STATUS_OF,
        lambda shape: {"outbox_id": shape.outbox_id},
        {"receipt_outbox": by("pk_receipt_outbox")},
    ),
    Case(
        "outbox/overview, newest first",
        outbox._OVERVIEW,
        lambda shape: {"limit": 20},
        {"receipt_outbox": by(), "purchases": by("pk_purchases")},
        {"receipt_outbox": by("pk_receipt_outbox")},
        page=True,
    ),
    # --- the audit trail ------------------------------------------------------------------
    Case(
        "events/of a purchase",
        events._EVENTS_OF_PURCHASE,
        lambda shape: {"purchase_pk": shape.purchase_pk},
        {
            "purchase_events": by("ix_purchase_events_purchase_id_seq"),
            "purchases": by("pk_purchases"),
        },
        page=True,
    ),
    Case(
        "events/of a payment event",
        events._EVENT_OF_PAYMENT,
        lambda shape: {"event_id": shape.payment_event_id},
        {"purchase_events": by("ix_purchase_events_payment_event_id")},
    ),
    # --- users and tokens -------------------------------------------------------------
    Case(
        "users/actor of a token",
        users._FIND_ACTOR,
        lambda shape: {"token_hash": shape.token_hash, "now": NOW},
        {"api_tokens": by("uq_api_tokens_token_hash"), "users": by("pk_users")},
    ),
    Case(
        "users/hold",
        users._HOLD_USER,
        lambda shape: {"user_id": shape.heavy},
        {"users": by("pk_users")},
    ),
    Case(
        "users/by email",
        users._USER_BY_EMAIL,
        lambda shape: {"email": shape.email},
        {"users": by("uq_users_email")},
    ),
    Case(
        "users/token by hash",
        users._TOKEN_BY_HASH,
        lambda shape: {"token_hash": shape.token_hash},
        {"api_tokens": by("uq_api_tokens_token_hash")},
    ),
    Case(
        "users/revoke a token",
        users._REVOKE_TOKEN,
        lambda shape: {"revoked_hash": shape.token_hash, "now": NOW},
        {"api_tokens": by("uq_api_tokens_token_hash")},
    ),
    Case(
        "users/revoke a user's tokens",
        users._REVOKE_TOKENS_OF,
        lambda shape: {"email": shape.email, "now": NOW},
        {"api_tokens": by("ix_api_tokens_user_id"), "users": by("uq_users_email")},
    ),
    # --- the catalogue ----------------------------------------------------------------
    Case(
        "courses/by slug",
        courses._COURSE_BY_SLUG,
        lambda shape: {"slug": shape.slug},
        {"courses": by("uq_courses_slug")},
    ),
    Case(
        "courses/id by slug",
        courses._COURSE_ID_BY_SLUG,
        lambda shape: {"slug": shape.slug},
        {"courses": by("uq_courses_slug")},
    ),
    Case(
        "courses/update",
        courses._UPDATE_COURSE,
        lambda shape: {"pk": 1, "new_title": "T", "new_price": 1, "new_currency": "EUR"},
        {"courses": by("pk_courses")},
    ),
    # --- rate limits (buckets live in PostgreSQL; on SQLite in the process) ------------
    Case(
        "rate limits/take from a bucket",
        buckets._TAKE,
        lambda shape: {"key": "user:1", "calls": 1, "burst": 20, "rate": 10.0},
        {"rate_limit_buckets": by("pk_rate_limit_buckets")},
        engines=frozenset({"postgresql"}),
    ),
]


def problems_of(case: Case, plan: Plan) -> list[str]:
    """How ``plan`` breaks the rules of ``case`` (see the module docstring)."""
    problems = []
    for read in plan.reads:
        named = read.table in case.searches or read.table in case.walks
        if not named:
            if read.table not in SMALL_TABLES:
                problems.append(f"{read.table} is read ({read.kind} {read.index})")
            continue
        if read.kind == "search" and read.index in case.searches.get(read.table, ()):
            continue
        if read.kind == "walk" and read.index in case.walks.get(read.table, ()):
            continue
        problems.append(f"{read.table}: {read.kind} {read.index or '(every row)'}")
    read_tables = {read.table for read in plan.reads}
    problems += [f"{table} is never read" for table in case.searches if table not in read_tables]
    if case.page and plan.sorts:
        problems.append("rows are sorted")
    return problems


# --- the databases ------------------------------------------------------------------------

CONDITIONS = ["sqlite", "sqlite-analyzed"] + (
    ["postgresql"] if "postgresql" in AVAILABLE_BACKENDS else []
)


@dataclass(frozen=True)
class Database:
    condition: str
    url: str
    shape: Shape


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each case on each database its engine has (one seeded database per engine)."""
    if "database" not in metafunc.fixturenames:
        return
    pairs = [
        pytest.param(condition, case, id=f"{condition}:{case.name}")
        for condition in CONDITIONS
        for case in CASES
        if condition.split("-")[0] in case.engines
    ]
    metafunc.parametrize(("database", "case"), pairs, indirect=["database"], scope="module")


@pytest.fixture(scope="module")
def seeded_sqlite(
    migrated_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Shape]:
    path = tmp_path_factory.mktemp("plans") / "seeded.sqlite3"
    shutil.copy(migrated_template, path)
    return path, asyncio.run(_seed(sqlite_url(path), analyze=False))


@pytest.fixture(scope="module")
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    condition = request.param
    if condition.startswith("sqlite"):
        path, shape = request.getfixturevalue("seeded_sqlite")
        if condition == "sqlite-analyzed":
            analyzed = path.with_name("analyzed.sqlite3")
            shutil.copy(path, analyzed)
            asyncio.run(_analyze(sqlite_url(analyzed)))
            path = analyzed
        yield Database(condition, sqlite_url(path), shape)
        return
    assert POSTGRES_ADMIN_URL is not None
    template = request.getfixturevalue("postgres_template")
    url = asyncio.run(databases.create_from_template(POSTGRES_ADMIN_URL, template))
    try:
        yield Database(condition, url, asyncio.run(_seed(url, analyze=True)))
    finally:
        asyncio.run(databases.drop(POSTGRES_ADMIN_URL, make_url(url).database or ""))


async def _seed(url: str, *, analyze: bool) -> Shape:
    engine = stock_engine(url)
    try:
        shape = await plans.seed(engine)
        if analyze:
            await plans.analyze(engine)
        return shape
    finally:
        await engine.dispose()


async def _analyze(url: str) -> None:
    engine = stock_engine(url)
    try:
        await plans.analyze(engine)
    finally:
        await engine.dispose()


# --- the test -----------------------------------------------------------------------------


async def test_the_statement_reads_its_index(database: Database, case: Case) -> None:
    engine = open_engine(database.url)
    try:
        values = case.values(database.shape)
        plan = await plans.explain(engine, case.statement, values)
        problems = problems_of(case, plan)
        assert not problems, f"{case.name}: {'; '.join(problems)}\n{plan}"
        if engine.dialect_name == "postgresql":
            generic = await plans.explain(engine, case.statement, values, generic=True)
            # PostgreSQL switches to the generic plan when it looks no dearer than the
            # custom ones, whose cost includes planning (1000 * cpu_operator_cost per
            # table and one more: 2.5 each by default).
            assert plan.cost is not None and generic.cost is not None
            planning = 2.5 * (len(plan.reads) + 1)
            if generic.cost <= plan.cost + planning:
                problems = problems_of(case, generic)
                assert not problems, f"{case.name}, generic plan: {'; '.join(problems)}\n{generic}"
    finally:
        await engine.close()
