"""The Marshmallow schemas: what each method accepts and how results are written."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from marshmallow import Schema, ValidationError

import schemas
from rpc_server.domain.records import (
    Backing,
    Course,
    Fulfillment,
    Purchase,
    PurchaseEventRecord,
    PurchasePage,
    Registration,
    SignedPayment,
    Source,
)
from rpc_server.domain.states import PurchaseState, Scope
from schemas import (
    CourseOut,
    CourseSaveParams,
    FulfillmentOut,
    Out,
    Params,
    PurchaseCreateParams,
    PurchaseEventOut,
    PurchaseEventsParams,
    PurchaseFulfillParams,
    PurchaseGetParams,
    PurchaseListParams,
    PurchaseOut,
    PurchasePageOut,
    RegistrationOut,
)

CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FULFILLED_AT = datetime(2024, 5, 1, 12, 5, 30, 123456, tzinfo=UTC)
CURSOR_ERROR = "Not a valid cursor: pass next_cursor unchanged."


def purchase(**changes: Any) -> Purchase:
    values: dict[str, Any] = {
        "pk": 7,
        "purchase_id": "0123456789abcdef0123456789abcdef",
        "owner_id": 3,
        "owner_email": "alice@example.com",
        "course_pk": 2,
        "course_slug": "python-basics",
        "course_title": "Python Basics",
        "amount": Decimal("49"),
        "currency": "USD",
        "state": PurchaseState.FULFILLED,
        "error_msg": None,
        "created_at": CREATED,
        "updated_at": FULFILLED_AT,
        "fulfilled_at": FULFILLED_AT,
    }
    values.update(changes)
    return Purchase(**values)


def errors_of(schema: Schema, data: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as raised:
        schema.load(data)
    messages = raised.value.messages
    assert isinstance(messages, dict)
    return messages


def encode_cursor(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


FULFILL = {"purchase_id": "abc123", "purchase_state": "fulfilled"}


# Every schema exported by ``schemas``.

EXPORTED = [getattr(schemas, name) for name in schemas.__all__]
PARAMS = [s for s in EXPORTED if isinstance(s, type) and issubclass(s, Params) and s is not Params]
OUTS = [s for s in EXPORTED if isinstance(s, type) and issubclass(s, Out) and s is not Out]


def test_every_exported_schema_is_params_or_out() -> None:
    assert {s.__name__ for s in PARAMS} == {
        "AuthenticateParams",
        "PurchaseSubscribeParams",
        "PurchaseUnsubscribeParams",
        "CourseListParams",
        "CourseSaveParams",
        "DiscoverParams",
        "PaymentProofParams",
        "PurchaseCreateParams",
        "PurchaseEventsParams",
        "PurchaseFulfillParams",
        "PurchaseGetParams",
        "PurchaseListParams",
        "RegistrationListParams",
    }
    assert {s.__name__ for s in OUTS} == {
        "AuthenticatedOut",
        "PurchaseResyncOut",
        "PurchaseUpdateOut",
        "CourseOut",
        "FulfillmentOut",
        "PurchaseEventOut",
        "PurchaseOut",
        "PurchasePageOut",
        "RegistrationOut",
        "RegistrationPageOut",
    }
    # The one exception: the payload of a signed payment event is neither a method's
    # input nor its output; it is read only after its signature has been verified.
    others = [s for s in EXPORTED if s not in (*PARAMS, *OUTS, Params, Out)]
    assert others == [schemas.PaymentEventPayload]


@pytest.mark.parametrize("params", PARAMS, ids=lambda s: s.__name__)
def test_every_params_field_is_load_only(params: type[Schema]) -> None:
    schema = params()
    for name, field in schema.fields.items():
        assert field.load_only, name
        assert not field.dump_only, name
    assert set(schema.load_fields) == set(schema.fields)
    assert schema.dump_fields == {}


@pytest.mark.parametrize("out", OUTS, ids=lambda s: s.__name__)
def test_every_out_field_is_dump_only(out: type[Schema]) -> None:
    schema = out()
    assert schema.fields
    for name, field in schema.fields.items():
        assert field.dump_only, name
        assert not field.load_only, name
    assert schema.load_fields == {}
    # So nothing of an output can ever be loaded back as input.
    unknown = {name: ["Unknown field."] for name in schema.fields}
    assert errors_of(schema, dict.fromkeys(schema.fields, "x")) == unknown


@pytest.mark.parametrize("params", PARAMS, ids=lambda s: s.__name__)
def test_params_reject_unknown_fields(params: type[Schema]) -> None:
    messages = errors_of(params(), {"surprise": 1})
    assert messages["surprise"] == ["Unknown field."]


@pytest.mark.parametrize("field", ["redirect_url", "purchase", "state", "fulfilled_at"])
def test_fulfill_params_reject_output_fields(field: str) -> None:
    assert errors_of(PurchaseFulfillParams(), {**FULFILL, field: "x"}) == {
        field: ["Unknown field."]
    }


@pytest.mark.parametrize("field", ["purchase_id", "state", "amount", "owner_id"])
def test_create_params_reject_server_owned_fields(field: str) -> None:
    data = {"course": "python-basics", field: "x"}
    assert errors_of(PurchaseCreateParams(), data) == {field: ["Unknown field."]}


def test_params_never_dump_their_fields() -> None:
    assert PurchaseFulfillParams().dump({**FULFILL, "error_msg": "x"}) == {}


# purchase.fulfill


@pytest.mark.parametrize("state", ["fulfilled", "failed", "canceled"])
def test_fulfill_accepts_the_three_outcomes(state: str) -> None:
    loaded = PurchaseFulfillParams().load({**FULFILL, "purchase_state": state})
    assert loaded["purchase_state"] is PurchaseState(state)
    assert loaded["purchase_id"] == "abc123"


@pytest.mark.parametrize("state", ["pending", "garbage", "FULFILLED", "", 1, None])
def test_fulfill_rejects_other_states(state: Any) -> None:
    messages = errors_of(PurchaseFulfillParams(), {**FULFILL, "purchase_state": state})
    assert list(messages) == ["purchase_state"]


def test_pending_is_rejected_with_the_requestable_choices() -> None:
    messages = errors_of(PurchaseFulfillParams(), {**FULFILL, "purchase_state": "pending"})
    assert messages == {"purchase_state": ["Must be one of: fulfilled, failed, canceled."]}


def test_fulfill_requires_purchase_id_and_state() -> None:
    messages = errors_of(PurchaseFulfillParams(), {})
    assert set(messages) == {"purchase_id", "purchase_state"}


def test_error_msg_is_at_most_1000_characters() -> None:
    loaded = PurchaseFulfillParams().load({**FULFILL, "error_msg": "x" * 1000})
    assert loaded["error_msg"] == "x" * 1000
    assert "error_msg" in errors_of(PurchaseFulfillParams(), {**FULFILL, "error_msg": "x" * 1001})


def test_error_msg_is_optional() -> None:
    assert "error_msg" not in PurchaseFulfillParams().load(FULFILL)


@pytest.mark.parametrize("purchase_id", ["a", "0123456789abcdef", "z" * 64])
def test_purchase_id_accepts_lowercase_alphanumerics(purchase_id: str) -> None:
    assert PurchaseGetParams().load({"purchase_id": purchase_id}) == {"purchase_id": purchase_id}


@pytest.mark.parametrize(
    "purchase_id",
    ["ABC", "", "a" * 65, "a-b", "a b", "ab\n", "\nab", "é", 12],
    ids=["uppercase", "empty", "too-long", "dash", "space", "trailing-newline",
         "leading-newline", "non-ascii", "number"],
)  # fmt: skip
@pytest.mark.parametrize("schema", [PurchaseGetParams, PurchaseFulfillParams])
def test_purchase_id_rejects_anything_else(schema: type[Schema], purchase_id: Any) -> None:
    data = {**FULFILL, "purchase_id": purchase_id}
    if schema is PurchaseGetParams:
        data = {"purchase_id": purchase_id}
    assert list(errors_of(schema(), data)) == ["purchase_id"]


# purchase.create


def test_create_params() -> None:
    loaded = PurchaseCreateParams().load({"course": "python-basics", "idempotency_key": "k" * 64})
    assert loaded == {"course": "python-basics", "idempotency_key": "k" * 64}
    assert PurchaseCreateParams().load({"course": "python-basics"}) == {"course": "python-basics"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "course"),
        ({"course": ""}, "course"),
        ({"course": "x" * 101}, "course"),
        ({"course": "python-basics", "idempotency_key": ""}, "idempotency_key"),
        ({"course": "python-basics", "idempotency_key": "k" * 65}, "idempotency_key"),
        ({"course": "python-basics", "idempotency_key": 5}, "idempotency_key"),
    ],
)
def test_create_params_rejects(data: dict[str, Any], field: str) -> None:
    assert list(errors_of(PurchaseCreateParams(), data)) == [field]


# purchase.list


@pytest.mark.parametrize("limit", [1, 50, 100])
def test_limit_accepts_1_to_100(limit: int) -> None:
    assert PurchaseListParams().load({"limit": limit}) == {"limit": limit}


@pytest.mark.parametrize("limit", [0, -1, 101, True, False, "5", 5.5, 5.0, None])
def test_limit_rejects_out_of_range_and_non_integers(limit: Any) -> None:
    assert list(errors_of(PurchaseListParams(), {"limit": limit})) == ["limit"]


def test_list_params_are_all_optional() -> None:
    assert PurchaseListParams().load({}) == {}


@pytest.mark.parametrize("state", list(PurchaseState))
def test_list_state_filter_accepts_every_state(state: PurchaseState) -> None:
    assert PurchaseListParams().load({"state": state.value}) == {"state": state}


def test_list_state_filter_rejects_garbage() -> None:
    assert list(errors_of(PurchaseListParams(), {"state": "lost"})) == ["state"]


@pytest.mark.parametrize("keyset", [0, 1, 7, 12345, 2**31, 2**63 - 1])
def test_cursor_round_trip(keyset: int) -> None:
    dumped = PurchasePageOut().dump(PurchasePage(items=[], next_before=keyset))
    cursor = dumped["next_cursor"]
    assert isinstance(cursor, str)
    assert str(keyset) not in cursor  # opaque
    assert PurchaseListParams().load({"cursor": cursor}) == {"cursor": keyset}


def test_last_page_has_a_null_cursor() -> None:
    dumped = PurchasePageOut().dump(PurchasePage(items=[], next_before=None))
    assert dumped == {"items": [], "next_cursor": None}


GARBAGE_CURSORS = {
    "not-base64": "not a cursor!",
    "bad-padding": "A",
    "empty": "",
    "too-long": "cD" + "A" * 63,
    "wrong-prefix": encode_cursor("x1"),
    "no-number": encode_cursor("p"),
    "negative": encode_cursor("p-1"),
    "not-a-number": encode_cursor("p1a"),
    "not-utf8": encode_cursor(b"\xff\xfe\xfd"),
    "non-ascii-text": "cDE\u00e9",
    # Unicode digits that are not decimal digits: "p²" passes str.isdigit().
    "superscript-digit": encode_cursor("p\u00b2"),
    # A keyset beyond a 64-bit integer cannot be a row id (the database overflows).
    "beyond-int64": encode_cursor(f"p{2**63}"),
}


@pytest.mark.parametrize("cursor", GARBAGE_CURSORS.values(), ids=GARBAGE_CURSORS.keys())
def test_garbage_cursors_are_rejected_with_a_message(cursor: str) -> None:
    assert errors_of(PurchaseListParams(), {"cursor": cursor}) == {"cursor": [CURSOR_ERROR]}


@pytest.mark.parametrize("cursor", [5, None, ["cDE"]])
def test_non_string_cursors_are_rejected(cursor: Any) -> None:
    assert list(errors_of(PurchaseListParams(), {"cursor": cursor})) == ["cursor"]


# Outputs.


def test_purchase_out() -> None:
    dumped = PurchaseOut().dump(purchase())
    assert dumped == {
        "purchase_id": "0123456789abcdef0123456789abcdef",
        "course": "python-basics",
        "amount": "49.00",
        "currency": "USD",
        "state": "fulfilled",
        "error_msg": None,
        "created_at": CREATED.isoformat(),
        "updated_at": FULFILLED_AT.isoformat(),
        "fulfilled_at": FULFILLED_AT.isoformat(),
    }
    assert datetime.fromisoformat(dumped["fulfilled_at"]) == FULFILLED_AT


@pytest.mark.parametrize(
    ("amount", "text"), [(Decimal("49"), "49.00"), (Decimal("39.5"), "39.50"), (Decimal(0), "0.00")]
)
def test_amounts_are_strings_with_two_places(amount: Decimal, text: str) -> None:
    assert PurchaseOut().dump(purchase(amount=amount))["amount"] == text


def test_purchase_out_of_a_failed_purchase() -> None:
    dumped = PurchaseOut().dump(
        purchase(state=PurchaseState.FAILED, error_msg="Card declined", fulfilled_at=None)
    )
    assert dumped["state"] == "failed"
    assert dumped["error_msg"] == "Card declined"
    assert dumped["fulfilled_at"] is None


def test_fulfillment_out_nests_the_purchase() -> None:
    answer = Fulfillment(redirect_url="https://shop.example/x", purchase=purchase())
    dumped = FulfillmentOut().dump(answer)
    assert dumped == {
        "redirect_url": "https://shop.example/x",
        "purchase": PurchaseOut().dump(purchase()),
    }


def test_purchase_page_out() -> None:
    items = [purchase(pk=9, purchase_id="b"), purchase(pk=8, purchase_id="a")]
    dumped = PurchasePageOut().dump(PurchasePage(items=items, next_before=8))
    assert [item["purchase_id"] for item in dumped["items"]] == ["b", "a"]
    assert PurchaseListParams().load({"cursor": dumped["next_cursor"]}) == {"cursor": 8}


def test_course_out() -> None:
    course = Course(pk=4, slug="python-basics", title="Python Basics", price=Decimal("49"),
                    currency="USD")  # fmt: skip
    assert CourseOut().dump(course) == {
        "slug": "python-basics",
        "title": "Python Basics",
        "price": "49.00",
        "currency": "USD",
    }


def test_registration_out() -> None:
    registration = Registration(pk=3, course_slug="sql", purchase_id="abc", created_at=CREATED)
    assert RegistrationOut().dump(registration) == {
        "course": "sql",
        "purchase_id": "abc",
        "created_at": CREATED.isoformat(),
    }


# CourseSaveParams (the operator's create-course).

COURSE = {"slug": "python-basics", "title": "Python Basics", "price": "49.00", "currency": "USD"}


def test_course_save_params_load() -> None:
    loaded = CourseSaveParams().load(COURSE)
    assert loaded == {**COURSE, "price": Decimal("49.00")}
    assert isinstance(loaded["price"], Decimal)


@pytest.mark.parametrize("slug", ["a", "0day", "a-b-c", "a" * 100])
def test_course_slug_accepts(slug: str) -> None:
    assert CourseSaveParams().load({**COURSE, "slug": slug})["slug"] == slug


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slug", "Python"),
        ("slug", "-python"),
        ("slug", "py thon"),
        ("slug", "a" * 101),
        ("slug", ""),
        ("slug", "python\n"),
        ("title", ""),
        ("title", "t" * 201),
        ("price", "-0.01"),
        ("price", "NaN"),
        ("price", "abc"),
        ("currency", "usd"),
        ("currency", "US"),
        ("currency", "USDX"),
        ("currency", "USD\n"),
    ],
)
def test_course_save_params_rejects(field: str, value: str) -> None:
    assert list(errors_of(CourseSaveParams(), {**COURSE, field: value})) == [field]


def test_course_save_params_requires_every_field() -> None:
    assert set(errors_of(CourseSaveParams(), {})) == set(COURSE)


def test_slug_regex_error_message() -> None:
    messages = errors_of(CourseSaveParams(), {**COURSE, "slug": "Bad Slug"})
    assert messages == {"slug": ["Use lowercase letters, digits and dashes."]}


@pytest.mark.parametrize(
    ("schema", "data", "field"),
    [
        (PurchaseCreateParams, {"course": "python\x00"}, "course"),
        (PurchaseCreateParams, {"course": "python", "idempotency_key": "k\x00"}, "idempotency_key"),
        (PurchaseFulfillParams, {**FULFILL, "purchase_state": "failed", "error_msg": "a\x00"},
         "error_msg"),
    ],
)  # fmt: skip
def test_no_text_param_accepts_a_nul_character(
    schema: type[Schema], data: dict[str, Any], field: str
) -> None:
    """PostgreSQL text cannot hold NUL: refuse it as an invalid param on every engine."""
    with pytest.raises(ValidationError) as raised:
        schema().load(data)
    assert "Must not contain NUL characters." in raised.value.messages[field]  # type: ignore[index]


# purchase.fulfill's payment_proof and error_msg (issue 14).

PROOF: dict[str, Any] = {
    "id": "evt_2KWPBgLlAfxdpx2AI54pPJ85f4W",
    "timestamp": 1714564800,
    "signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
    "payload": '{"type": "payment.succeeded", "data": {}}',
}


def proof_errors(proof: Any) -> Any:
    messages = errors_of(PurchaseFulfillParams(), {**FULFILL, "payment_proof": proof})
    assert list(messages) == ["payment_proof"]
    return messages["payment_proof"]


def test_payment_proof_loads_as_the_signed_payment() -> None:
    loaded = PurchaseFulfillParams().load({**FULFILL, "payment_proof": PROOF})
    assert loaded["payment_proof"] == SignedPayment(
        message_id=PROOF["id"],
        timestamp=1714564800,
        signature=PROOF["signature"],
        payload=PROOF["payload"].encode(),
    )


def test_payment_proof_payload_keeps_its_exact_bytes() -> None:
    payload = '{ "type":"payment.succeeded" ,\n "data": {"note": "café ✓"}}'
    loaded = PurchaseFulfillParams().load(
        {**FULFILL, "payment_proof": {**PROOF, "payload": payload}}
    )
    assert loaded["payment_proof"].payload == payload.encode("utf-8")


def test_payment_proof_is_optional() -> None:
    assert "payment_proof" not in PurchaseFulfillParams().load(FULFILL)


@pytest.mark.parametrize("missing", sorted(PROOF))
def test_payment_proof_needs_every_field(missing: str) -> None:
    proof = {name: value for name, value in PROOF.items() if name != missing}
    assert proof_errors(proof) == {missing: ["Missing data for required field."]}


def test_payment_proof_rejects_unknown_fields() -> None:
    assert proof_errors({**PROOF, "amount": "49.00"}) == {"amount": ["Unknown field."]}


@pytest.mark.parametrize(
    "timestamp",
    ["1714564800", 1714564800.0, 1714564800.5, True, False, None, -1, 2**53 + 1],
    ids=["string", "whole-float", "float", "true", "false", "null", "negative", "huge"],
)
def test_payment_proof_timestamp_is_an_integer(timestamp: Any) -> None:
    assert list(proof_errors({**PROOF, "timestamp": timestamp})) == ["timestamp"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("id", ""),
        ("id", "evt 1"),
        ("id", "x" * 256),
        ("id", 5),
        ("signature", ""),
        ("signature", "v1," + "A" * 2048),
        ("signature", ["v1,AAAA"]),
        ("payload", ""),
        ("payload", {"type": "payment.succeeded"}),
        ("payload", "x" * (64 * 1024 + 1)),
        ("payload", "a\x00b"),
    ],
)
def test_payment_proof_field_values(name: str, value: Any) -> None:
    assert list(proof_errors({**PROOF, name: value})) == [name]


@pytest.mark.parametrize("proof", ["v1,abc", ["evt", 1, "v1,abc", "{}"], 5, None])
def test_payment_proof_must_be_an_object(proof: Any) -> None:
    assert proof_errors(proof)


@pytest.mark.parametrize(
    "message",
    ["line\nbreak", "carriage\rreturn", "tab\there", "bell\x07", "del\x7f", "esc\x1b[31m",
     "sep\u2028arator", "bidi\u202eoverride", "\x85next-line"],
    ids=["newline", "cr", "tab", "bell", "del", "escape", "line-separator", "bidi-override",
         "nel"],
)  # fmt: skip
def test_error_msg_must_be_printable_text(message: str) -> None:
    messages = errors_of(
        PurchaseFulfillParams(), {**FULFILL, "purchase_state": "failed", "error_msg": message}
    )
    assert messages == {"error_msg": ["Must be printable text (no control characters)."]}


@pytest.mark.parametrize("message", ["Card declined", "Karte abgelehnt, zu wenig Guthaben ✓ café"])
def test_error_msg_accepts_printable_text(message: str) -> None:
    loaded = PurchaseFulfillParams().load(
        {**FULFILL, "purchase_state": "failed", "error_msg": message}
    )
    assert loaded["error_msg"] == message


def test_purchase_events_params() -> None:
    assert PurchaseEventsParams().load({"purchase_id": "abc"}) == {"purchase_id": "abc"}
    assert list(errors_of(PurchaseEventsParams(), {})) == ["purchase_id"]
    assert list(errors_of(PurchaseEventsParams(), {"purchase_id": "A B"})) == ["purchase_id"]


def event_record(**changes: Any) -> PurchaseEventRecord:
    values: dict[str, Any] = {
        "seq": 42,
        "purchase_id": "0123456789abcdef0123456789abcdef",
        "from_state": PurchaseState.PENDING,
        "to_state": PurchaseState.FULFILLED,
        "actor_user_id": 3,
        "actor_email": "support@example.com",
        "actor_scope": Scope.STAFF,
        "source": Source.RPC,
        "backing": Backing.STAFF_COMP,
        "payment_ref": "pi_1",
        "error_msg": None,
        "created_at": FULFILLED_AT,
    }
    values.update(changes)
    return PurchaseEventRecord(**values)


def test_purchase_event_out_dumps_every_field() -> None:
    assert PurchaseEventOut().dump(event_record()) == {
        "seq": 42,
        "purchase_id": "0123456789abcdef0123456789abcdef",
        "from_state": "pending",
        "to_state": "fulfilled",
        "actor_scope": "staff",
        "actor_email": "support@example.com",
        "source": "rpc",
        "evidence": "staff_comp",
        "payment_ref": "pi_1",
        "error_msg": None,
        "created_at": FULFILLED_AT.isoformat(),
    }


def test_purchase_event_out_of_a_creation_and_of_the_webhook() -> None:
    creation = PurchaseEventOut().dump(
        event_record(from_state=None, to_state=PurchaseState.PENDING, backing=None,
                     payment_ref=None, actor_scope=Scope.BUYER)
    )  # fmt: skip
    assert (creation["from_state"], creation["to_state"], creation["evidence"]) == (
        None,
        "pending",
        None,
    )
    webhook = PurchaseEventOut().dump(
        event_record(actor_user_id=None, actor_email=None, actor_scope=None,
                     source=Source.WEBHOOK, backing=Backing.PAYMENT_EVENT,
                     to_state=PurchaseState.FAILED, error_msg="declined")
    )  # fmt: skip
    assert webhook["actor_scope"] is None
    assert webhook["actor_email"] is None
    assert (webhook["source"], webhook["evidence"]) == ("webhook", "payment_event")
    assert webhook["error_msg"] == "declined"
    assert "actor_user_id" not in webhook  # an internal id is never shown
