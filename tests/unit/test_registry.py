"""The method registry: params by position or by name, summaries, and one call end to end."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from jsonrpcserver.async_dispatcher import call
from jsonrpcserver.dispatcher import create_request, to_response
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.result import Result
from marshmallow import ValidationError

from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.records import Actor, SignedPayment
from rpc_server.domain.states import PurchaseState
from rpc_server.jsonrpc.context import RpcContext
from rpc_server.jsonrpc.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    NOT_FOUND,
    PAYMENT_NOT_VERIFIED,
    UNAUTHENTICATED,
)
from rpc_server.jsonrpc.registry import MethodRegistry, RpcMethod
from rpc_server.methods import REGISTRY
from rpc_server.payment_signatures import PaymentSignatures
from schemas import CourseListParams, CourseOut
from tests.payments import TEST_PAYMENT_KEY
from tests.unit.conftest import FRONTEND_URL, FakeWorld


def method(name: str) -> RpcMethod:
    return REGISTRY.methods[name]


def params_error(name: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> Any:
    with pytest.raises(ValidationError) as raised:
        method(name).load_params(args, kwargs or {})
    return raised.value.messages


def test_the_registry_holds_the_documented_methods() -> None:
    assert set(REGISTRY.methods) == {
        "course.list",
        "purchase.create",
        "purchase.get",
        "purchase.list",
        "purchase.fulfill",
        "purchase.events",
        "registration.list",
        "rpc.discover",
        "rpc.authenticate",
        "purchase.subscribe",
        "purchase.unsubscribe",
    }
    assert REGISTRY.dispatch_table() == REGISTRY.methods
    public = [name for name, m in REGISTRY.methods.items() if not m.auth]
    assert public == ["course.list", "rpc.authenticate", "rpc.discover"]


def test_positional_params_map_in_declaration_order() -> None:
    loaded = method("purchase.fulfill").load_params(["abc123", "failed", "Card declined"], {})
    assert loaded == {
        "purchase_id": "abc123",
        "purchase_state": PurchaseState.FAILED,
        "error_msg": "Card declined",
    }


def test_fewer_positional_params_than_fields() -> None:
    loaded = method("purchase.fulfill").load_params(["abc123", "canceled"], {})
    assert loaded == {"purchase_id": "abc123", "purchase_state": PurchaseState.CANCELED}


def test_positional_params_of_create_and_list() -> None:
    assert method("purchase.create").load_params(["python-basics", "order-1"], {}) == {
        "course": "python-basics",
        "idempotency_key": "order-1",
    }
    assert method("purchase.list").load_params(["fulfilled", 5], {}) == {
        "state": PurchaseState.FULFILLED,
        "limit": 5,
    }


def test_positional_errors_name_the_field() -> None:
    assert list(params_error("purchase.get", ["NOT-VALID"])) == ["purchase_id"]
    assert list(params_error("purchase.fulfill", ["abc", "pending"])) == ["purchase_state"]


def test_too_many_positional_params() -> None:
    messages = params_error("purchase.get", ["abc", "extra"])
    assert list(messages) == ["params"]
    [message] = messages["params"]
    assert "at most 1" in message
    assert "purchase_id" in message
    assert "got 2" in message


def test_positional_params_for_a_method_without_params() -> None:
    messages = params_error("course.list", [1])
    [message] = messages["params"]
    assert "at most 0" in message
    assert "none" in message


def test_params_by_name() -> None:
    loaded = method("purchase.fulfill").load_params(
        [], {"purchase_state": "fulfilled", "purchase_id": "abc123"}
    )
    assert loaded == {"purchase_id": "abc123", "purchase_state": PurchaseState.FULFILLED}


def test_unknown_param_by_name() -> None:
    messages = params_error("purchase.get", [], {"purchase_id": "abc", "owner_id": 1})
    assert messages == {"owner_id": ["Unknown field."]}


def test_no_params_at_all() -> None:
    assert method("course.list").load_params([], {}) == {}
    assert list(params_error("purchase.get", [])) == ["purchase_id"]


@pytest.mark.parametrize("name", sorted(REGISTRY.methods))
def test_summary_is_the_first_line_of_the_handler_docstring(name: str) -> None:
    rpc_method = method(name)
    doc = rpc_method.handler.__doc__
    assert doc
    assert rpc_method.summary == doc.strip().splitlines()[0]
    assert rpc_method.summary


async def documented(ctx: RpcContext, actor: Actor | None) -> list[Any]:
    """First line.

    More detail that is not part of the summary.
    """
    return []


async def undocumented(ctx: RpcContext, actor: Actor | None) -> list[Any]:
    return []


def test_summary_of_a_multi_line_docstring_and_of_none() -> None:
    assert RpcMethod("x.doc", documented, CourseListParams, CourseOut()).summary == "First line."
    assert RpcMethod("x.nodoc", undocumented, CourseListParams, CourseOut()).summary == "x.nodoc"


def test_a_name_cannot_be_registered_twice() -> None:
    one = RpcMethod("x.same", documented, CourseListParams, CourseOut())
    with pytest.raises(ValueError, match=r"x\.same"):
        MethodRegistry([one, one])


# Calling a method (what jsonrpcserver does), over the fake unit of work.

TOKEN = "rpcs_alice"


def answer_of(result: Result) -> dict[str, Any]:
    """The answer object the envelope makes of a call's result, through jsonrpcserver's
    public steps (its Result is an Either whose contents are private)."""
    request = create_request({"jsonrpc": "2.0", "method": "m", "id": 1})
    answer = to_serializable_one(to_response(request, result))
    assert isinstance(answer, dict)
    return answer


def result_of(result: Result) -> Any:
    """A successful call's dumped result (fails the test on an error answer)."""
    answer = answer_of(result)
    assert "result" in answer, answer
    return answer["result"]


def error_of(result: Result) -> dict[str, Any]:
    """A failed call's error object (fails the test on a result)."""
    answer = answer_of(result)
    assert "error" in answer, answer
    error: dict[str, Any] = answer["error"]
    return error


def context(fake: FakeWorld, token: str | None = TOKEN) -> RpcContext:
    fake.uow.add_token(fake.alice, TOKEN)
    return RpcContext(
        uow=fake.uow,
        links=FrontendLinks(FRONTEND_URL),
        payments=PaymentSignatures((TEST_PAYMENT_KEY,)),
        token=token,
    )


async def test_call_succeeds(fake: FakeWorld) -> None:
    result = await method("purchase.create")(context(fake), "python-basics")
    dumped = result_of(result)
    assert dumped["course"] == "python-basics"
    assert dumped["state"] == "pending"
    assert dumped["amount"] == "49.00"
    [stored] = fake.uow.purchases
    assert stored.owner_id == fake.alice.user_id
    assert dumped["purchase_id"] == stored.purchase_id


async def test_call_without_a_token_is_unauthenticated(fake: FakeWorld) -> None:
    result = await method("purchase.list")(context(fake, token=None))
    error = error_of(result)
    assert error["code"] == UNAUTHENTICATED


async def test_call_with_an_unknown_token_is_unauthenticated(fake: FakeWorld) -> None:
    result = await method("purchase.list")(context(fake, token="rpcs_forged"))
    error = error_of(result)
    assert error["code"] == UNAUTHENTICATED


async def test_method_without_auth_needs_no_token(fake: FakeWorld) -> None:
    result = await method("course.list")(context(fake, token=None))
    assert [c["slug"] for c in result_of(result)] == ["python-basics", "sql-fundamentals"]


async def test_call_with_invalid_params(fake: FakeWorld) -> None:
    result = await method("purchase.get")(context(fake), purchase_id="NOT VALID")
    error = error_of(result)
    assert error["code"] == INVALID_PARAMS
    assert list(error["data"]) == ["purchase_id"]


async def test_a_param_named_ctx_is_an_unknown_field(fake: FakeWorld) -> None:
    # Called as the envelope calls it (jsonrpcserver's call, no signature check): the
    # context is positional-only, so a client's "ctx" reaches the schema as a param.
    request = create_request(
        {"jsonrpc": "2.0", "method": "purchase.get", "params": {"ctx": 1, "purchase_id": "0" * 32}}
    )
    error = error_of(await call(request, context(fake), method("purchase.get")))
    assert error["code"] == INVALID_PARAMS
    assert error["data"] == {"ctx": ["Unknown field."]}


async def test_call_maps_domain_errors(fake: FakeWorld) -> None:
    result = await method("purchase.get")(context(fake), "0" * 32)
    error = error_of(result)
    assert error["code"] == NOT_FOUND
    assert error["data"] == {"purchase_id": "0" * 32}


@pytest.mark.parametrize(
    "decoded", ["p\u00b2", f"p{2**63}"], ids=["superscript-digit", "beyond-int64"]
)
async def test_a_bad_cursor_is_invalid_params_not_an_internal_error(
    fake: FakeWorld, decoded: str
) -> None:
    cursor = base64.urlsafe_b64encode(decoded.encode()).decode().rstrip("=")
    result = await method("purchase.list")(context(fake), cursor=cursor)
    error = error_of(result)
    assert error["code"] != INTERNAL_ERROR
    assert error["code"] == INVALID_PARAMS
    assert error["data"] == {"cursor": ["Not a valid cursor: pass next_cursor unchanged."]}


# purchase.fulfill with a payment proof, and purchase.events (issue 14).

PROOF_SHAPE = {"id": "evt_1", "timestamp": 1714564800, "signature": "v1,AAAA", "payload": "{}"}


def test_payment_proof_is_the_fourth_positional_param() -> None:
    loaded = method("purchase.fulfill").load_params(["abc123", "fulfilled", "", PROOF_SHAPE], {})
    assert loaded["payment_proof"] == SignedPayment("evt_1", 1714564800, "v1,AAAA", b"{}")


async def pending_purchase_id(fake: FakeWorld, ctx: RpcContext) -> str:
    created = await method("purchase.create")(ctx, "python-basics")
    return str(result_of(created)["purchase_id"])


@pytest.mark.parametrize(
    ("proof", "field"),
    [
        ({k: v for k, v in PROOF_SHAPE.items() if k != "signature"}, "signature"),
        ({**PROOF_SHAPE, "extra": 1}, "extra"),
        ({**PROOF_SHAPE, "timestamp": "1714564800"}, "timestamp"),
        ({**PROOF_SHAPE, "timestamp": 1714564800.0}, "timestamp"),
        ({**PROOF_SHAPE, "timestamp": True}, "timestamp"),
    ],
    ids=["missing", "unknown", "string-timestamp", "float-timestamp", "bool-timestamp"],
)
async def test_a_misshapen_payment_proof_is_invalid_params(
    fake: FakeWorld, proof: dict[str, Any], field: str
) -> None:
    ctx = context(fake)
    purchase_id = await pending_purchase_id(fake, ctx)
    result = await method("purchase.fulfill")(
        ctx, purchase_id=purchase_id, purchase_state="fulfilled", payment_proof=proof
    )
    error = error_of(result)
    assert error["code"] == INVALID_PARAMS == -32602
    assert list(error["data"]) == ["payment_proof"]
    assert list(error["data"]["payment_proof"]) == [field]
    assert fake.uow.purchase(purchase_id).state is PurchaseState.PENDING


async def test_a_buyer_without_a_proof_gets_402_missing(fake: FakeWorld) -> None:
    ctx = context(fake)
    purchase_id = await pending_purchase_id(fake, ctx)
    result = await method("purchase.fulfill")(ctx, purchase_id, "fulfilled")
    error = error_of(result)
    assert error["code"] == PAYMENT_NOT_VERIFIED == 402
    assert error["message"].startswith("Payment not verified: ")
    assert error["data"] == {"reason": "missing"}
    assert fake.uow.purchase(purchase_id).state is PurchaseState.PENDING


async def test_purchase_events_call(fake: FakeWorld) -> None:
    ctx = context(fake)
    purchase_id = await pending_purchase_id(fake, ctx)
    result = await method("purchase.events")(ctx, purchase_id)
    [created] = result_of(result)
    assert created["purchase_id"] == purchase_id
    assert (created["from_state"], created["to_state"]) == (None, "pending")
    assert (created["actor_scope"], created["actor_email"]) == ("buyer", "alice@example.com")
    assert (created["source"], created["evidence"]) == ("rpc", None)
