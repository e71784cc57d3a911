"""The compiled dumper (schemas/dumping.py) against ``Schema.dump``: equal on generated data.

Equal means the same keys in the same order and the same values of the same types,
recursively (a Decimal or a float compared by its repr, so NaN, -0 and the exponent
count); where Marshmallow raises, the dumper raises the same exception.
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from marshmallow import Schema, fields, post_dump, pre_dump

from rpc_server.domain.records import (
    Actor,
    Backing,
    Course,
    Fulfillment,
    Purchase,
    PurchaseEventRecord,
    PurchasePage,
    PurchaseUpdate,
    Registration,
    RegistrationPage,
    Source,
)
from rpc_server.domain.states import PurchaseState, Scope
from rpc_server.methods import REGISTRY
from schemas.dumping import compile_dumper, marshmallow_fallbacks


def assert_same(ours: Any, theirs: Any, where: str = "result") -> None:
    assert type(ours) is type(theirs), where
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), where  # the same keys in the same order
        for key, value in theirs.items():
            assert_same(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (mine, value) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(mine, value, f"{where}[{index}]")
    elif isinstance(theirs, decimal.Decimal | float):
        assert repr(ours) == repr(theirs), where
    else:
        assert ours == theirs, where


def outcome(dump: Callable[[Any], Any], value: Any) -> tuple[str, Any]:
    try:
        return "dumped", dump(value)
    except Exception as exc:
        return "raised", (type(exc), str(exc))


def assert_dumps_alike(ours: Callable[[Any], Any], schema: Schema, value: Any) -> None:
    mine, expected = outcome(ours, value), outcome(schema.dump, value)
    assert mine[0] == expected[0], (mine, expected)
    if expected[0] == "raised":
        assert mine == expected
    else:
        assert_same(mine[1], expected[1])


# --- generated domain records ---------------------------------------------------------

# Fixed offsets down to the microsecond (isoformat writes seconds and microseconds of an
# offset), UTC, and naive datetimes.
OFFSETS = st.builds(
    timezone,
    st.timedeltas(
        min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
    ),
)
DATETIMES = st.datetimes(timezones=st.none() | st.just(UTC) | OFFSETS)
# Odd scales, huge and tiny exponents, negative zero, NaN and infinities: some quantize to
# cents, some make quantize raise InvalidOperation (more digits than the context holds).
DECIMALS = (
    st.decimals(allow_nan=True, allow_infinity=True)
    | st.decimals(min_value=-(10**12), max_value=10**12, places=3)
    | st.decimals(min_value=-10, max_value=10, places=4)  # ties when rounded to 3 places
    | st.builds(
        decimal.Decimal.scaleb,
        st.decimals(allow_nan=False, allow_infinity=False),
        st.integers(-40, 40),
    )
)
INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text()
MAYBE_TEXT = st.none() | TEXT

PURCHASES = st.builds(
    Purchase,
    pk=INTS,
    purchase_id=TEXT,
    owner_id=INTS,
    owner_email=TEXT,
    course_pk=INTS,
    course_slug=TEXT,
    course_title=TEXT,
    amount=DECIMALS,
    currency=TEXT,
    state=st.sampled_from(PurchaseState),
    error_msg=MAYBE_TEXT,
    created_at=DATETIMES,
    updated_at=DATETIMES,
    fulfilled_at=st.none() | DATETIMES,
)
REGISTRATIONS = st.builds(
    Registration, pk=INTS, course_slug=TEXT, purchase_id=TEXT, created_at=DATETIMES
)
EVENTS = st.builds(
    PurchaseEventRecord,
    seq=INTS,
    purchase_id=TEXT,
    from_state=st.none() | st.sampled_from(PurchaseState),
    to_state=st.sampled_from(PurchaseState),
    actor_user_id=st.none() | INTS,
    actor_email=MAYBE_TEXT,
    actor_scope=st.none() | st.sampled_from(Scope),
    source=st.sampled_from(Source),
    backing=st.none() | st.sampled_from(Backing),
    payment_ref=MAYBE_TEXT,
    error_msg=MAYBE_TEXT,
    created_at=DATETIMES,
)
COURSES = st.builds(Course, pk=INTS, slug=TEXT, title=TEXT, price=DECIMALS, currency=TEXT)
NEXT_BEFORE = st.none() | st.integers(min_value=0, max_value=2**63 - 1)

# What each result schema of the registry dumps, by (schema class, many).
RECORDS: dict[tuple[str, bool], st.SearchStrategy[Any]] = {
    ("PurchaseOut", False): PURCHASES,
    ("PurchasePageOut", False): st.builds(
        PurchasePage, items=st.lists(PURCHASES, max_size=5), next_before=NEXT_BEFORE
    ),
    ("FulfillmentOut", False): st.builds(Fulfillment, redirect_url=TEXT, purchase=PURCHASES),
    ("PurchaseEventOut", True): st.lists(EVENTS, max_size=5),
    ("CourseOut", True): st.lists(COURSES, max_size=5),
    ("RegistrationOut", True): st.lists(REGISTRATIONS, max_size=5),
    ("AuthenticatedOut", False): st.builds(
        Actor, user_id=INTS, email=TEXT, scope=st.sampled_from(Scope)
    ),
    ("RegistrationPageOut", False): st.builds(
        RegistrationPage, items=st.lists(REGISTRATIONS, max_size=5), next_before=NEXT_BEFORE
    ),
}
ROUNDINGS = st.sampled_from(
    [
        decimal.ROUND_HALF_EVEN,
        decimal.ROUND_HALF_UP,
        decimal.ROUND_DOWN,
        decimal.ROUND_UP,
        decimal.ROUND_CEILING,
        decimal.ROUND_FLOOR,
        decimal.ROUND_05UP,
    ]
)
RESULT_SCHEMAS = [
    (name, which)
    for name, method in REGISTRY.methods.items()
    for which in ("result", "result_without_params")
    if getattr(method, which) is not None
]


def records_for(schema: Schema) -> st.SearchStrategy[Any]:
    key = (type(schema).__name__, bool(schema.many))
    assert key in RECORDS, f"no generated records for {key}: add them to RECORDS"
    return RECORDS[key]


@pytest.mark.parametrize("notification", sorted(REGISTRY.notifications))
@given(data=st.data())
def test_the_notifications_dump_as_their_schema_does(
    notification: str, data: st.DataObject
) -> None:
    """purchase.updated and purchase.resync are serialized by compiled dumpers too
    (rpc_server/live/messages.py): equal to Marshmallow's dump."""
    schema = REGISTRY.notifications[notification].result
    records = {
        "PurchaseUpdateOut": st.builds(PurchaseUpdate, event=EVENTS, purchase=PURCHASES),
        "PurchaseResyncOut": st.fixed_dictionaries({"seq": INTS, "reason": TEXT}),
    }
    record = data.draw(records[type(schema).__name__])
    # Alike, raising included: a huge amount makes both quantizations raise.
    assert_dumps_alike(compile_dumper(schema), schema, record)
    assert not marshmallow_fallbacks(schema)


def test_every_result_schema_of_the_registry_is_covered() -> None:
    assert ("purchase.get", "result") in RESULT_SCHEMAS
    assert ("registration.list", "result_without_params") in RESULT_SCHEMAS
    for name, which in RESULT_SCHEMAS:
        records_for(getattr(REGISTRY.methods[name], which))


@pytest.mark.parametrize(("method_name", "which"), RESULT_SCHEMAS)
@given(data=st.data())
def test_the_registry_dumps_results_as_their_schema_does(
    method_name: str, which: str, data: st.DataObject
) -> None:
    method = REGISTRY.methods[method_name]
    schema = getattr(method, which)
    value = data.draw(records_for(schema))
    # The dumper the registry compiled, reached the way a call reaches it.
    params: dict[str, Any] | None = {} if which == "result_without_params" else None
    assert_dumps_alike(lambda v: method.dump_result(v, params), schema, value)
    # Quantized in the caller's decimal context, as Marshmallow does.
    with decimal.localcontext(prec=data.draw(st.integers(1, 40)), rounding=data.draw(ROUNDINGS)):
        assert_dumps_alike(compile_dumper(schema), schema, value)


def as_mapping(record: Any, keep: Callable[[str], bool], kind: type) -> Any:
    names = [f.name for f in dataclass_fields(record) if keep(f.name)]
    values = {name: getattr(record, name) for name in names}
    return values if kind is dict else SimpleNamespace(**values)


@given(
    record=RECORDS[("FulfillmentOut", False)],
    dropped=st.sets(st.sampled_from([f.name for f in dataclass_fields(Purchase)])),
    kind=st.sampled_from([dict, SimpleNamespace]),
)
def test_mappings_and_objects_with_absent_values_dump_alike(
    record: Fulfillment, dropped: set[str], kind: type
) -> None:
    """A dict is read by key, anything else by attribute; an absent value leaves its key
    out, at the top and nested."""
    schema = REGISTRY.methods["purchase.fulfill"].result
    assert schema is not None
    purchase = as_mapping(record.purchase, lambda name: name not in dropped, kind)
    value = {"redirect_url": record.redirect_url, "purchase": purchase}
    assert_dumps_alike(compile_dumper(schema), schema, value)
    nested = REGISTRY.methods["purchase.get"].result
    assert nested is not None
    assert_dumps_alike(compile_dumper(nested), nested, purchase)


def test_purchase_results_are_compiled_without_any_fallback() -> None:
    for name in ("purchase.get", "purchase.create", "purchase.fulfill", "purchase.events"):
        method = REGISTRY.methods[name]
        assert method.result is not None
        assert marshmallow_fallbacks(method.result) == (), name
        assert method.result_dumper is not None
        assert method.result_dumper != method.result.dump, name
    # Only the custom cursor field is left to Marshmallow, anywhere in the registry.
    for name, which in RESULT_SCHEMAS:
        schema = getattr(REGISTRY.methods[name], which)
        assert set(marshmallow_fallbacks(schema)) <= {"next_cursor"}, (name, which)
    page = REGISTRY.methods["purchase.list"].result
    assert page is not None
    assert marshmallow_fallbacks(page) == ("next_cursor",)


def test_a_purchase_dumps_as_documented() -> None:
    purchase = Purchase(
        pk=7,
        purchase_id="abc",
        owner_id=3,
        owner_email="alice@example.com",
        course_pk=2,
        course_slug="python-basics",
        course_title="Python Basics",
        amount=decimal.Decimal("49.005"),
        currency="USD",
        state=PurchaseState.FULFILLED,
        error_msg=None,
        created_at=datetime(2024, 5, 1, 12, tzinfo=UTC),
        updated_at=datetime(2024, 5, 1, 12, 5),
        fulfilled_at=None,
    )
    assert REGISTRY.methods["purchase.get"].dump_result(purchase) == {
        "purchase_id": "abc",
        "course": "python-basics",
        "amount": "49.00",  # quantized half-even, as a string
        "currency": "USD",
        "state": "fulfilled",
        "error_msg": None,
        "created_at": "2024-05-01T12:00:00+00:00",
        "updated_at": "2024-05-01T12:05:00",
        "fulfilled_at": None,
    }


# --- every field class the compiler knows, and what it leaves to Marshmallow ----------


class Shade(enum.Enum):
    LIGHT = 1
    DARK = "dark"
    UNSET = None


class Access(enum.Flag):
    READ = 1
    WRITE = 2


class Inner(Schema):
    number = fields.Integer()
    label = fields.String(data_key="text")


class Everything(Schema):
    text = fields.String()
    count = fields.Integer(as_string=True)
    plain_count = fields.Integer()
    ratio = fields.Float()
    ratio_text = fields.Float(as_string=True)
    amount = fields.Decimal()
    rounded = fields.Decimal(places=3, rounding=decimal.ROUND_HALF_UP, as_string=True)
    nan_ok = fields.Decimal(places=1, allow_nan=True)
    flag = fields.Boolean()
    raw = fields.Raw()
    mapping = fields.Dict()
    shade = fields.Enum(Shade)
    shade_value = fields.Enum(Shade, by_value=True)
    shade_text = fields.Enum(Shade, by_value=fields.String())
    state = fields.Enum(PurchaseState, by_value=True)
    access = fields.Enum(Access)
    access_value = fields.Enum(Access, by_value=True)
    when = fields.DateTime()
    when_timestamp = fields.DateTime(format="timestamp")
    when_rfc = fields.DateTime(format="rfc")
    when_custom = fields.DateTime(format="%Y/%m/%d %H-%M")
    child = fields.Nested(Inner)
    children = fields.Nested(Inner, many=True)
    child_list = fields.List(fields.Nested(Inner))
    numbers = fields.List(fields.Integer())
    renamed = fields.String(attribute="other", data_key="shown")


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


INNER = st.fixed_dictionaries(
    {}, optional={"number": maybe(st.integers() | st.booleans()), "label": maybe(TEXT)}
)
# Members, and combinations Flag makes on the fly.
ACCESS = st.sampled_from([Access.READ, Access.WRITE, Access.READ | Access.WRITE, Access(0)])
FLOATS = st.floats() | st.integers(-(2**60), 2**60)
EVERYTHING = st.fixed_dictionaries(
    {},
    optional={
        # bytes are decoded as UTF-8 (or raise alike); other values go through str()
        "text": maybe(TEXT | st.binary() | st.integers() | st.sampled_from(PurchaseState)),
        "count": maybe(st.integers() | st.booleans()),
        "plain_count": maybe(st.integers() | FLOATS.filter(lambda f: f == f and abs(f) < 1e300)),
        "ratio": maybe(FLOATS),
        "ratio_text": maybe(FLOATS),
        "amount": maybe(DECIMALS | st.integers()),
        "rounded": maybe(DECIMALS | FLOATS),
        "nan_ok": maybe(DECIMALS),
        "flag": maybe(st.booleans()),
        "raw": maybe(st.integers() | TEXT | st.lists(st.integers())),
        "mapping": maybe(st.dictionaries(TEXT, st.integers(), max_size=3)),
        "shade": maybe(st.sampled_from(Shade)),
        "shade_value": maybe(st.sampled_from(Shade)),
        "shade_text": maybe(st.sampled_from(Shade)),
        # A StrEnum member equals its value, which has no .value: both raise alike.
        "state": maybe(st.sampled_from(PurchaseState) | st.sampled_from(["pending", "failed"])),
        "access": maybe(ACCESS),
        "access_value": maybe(ACCESS),
        "when": maybe(DATETIMES),
        "when_timestamp": maybe(DATETIMES),
        "when_rfc": maybe(DATETIMES),
        "when_custom": maybe(DATETIMES),
        "child": maybe(INNER),
        "children": maybe(st.lists(maybe(INNER), max_size=3)),
        "child_list": maybe(st.lists(maybe(INNER), max_size=3)),
        "numbers": maybe(st.lists(maybe(st.integers()), max_size=3)),
        "other": maybe(TEXT),
    },
)
FIELD_NAMES = sorted(Everything().dump_fields)


def test_every_field_class_is_compiled() -> None:
    assert marshmallow_fallbacks(Everything()) == ()


@given(value=EVERYTHING, as_object=st.booleans())
# The field's own rounding, not the context's: half-up gives 0.003, half-even 0.002.
@example(value={"rounded": decimal.Decimal("0.0025")}, as_object=False)
def test_every_known_field_dumps_alike(value: dict[str, Any], as_object: bool) -> None:
    data = SimpleNamespace(**value) if as_object else value
    schema = Everything()
    assert_dumps_alike(compile_dumper(schema), schema, data)


@given(
    values=st.lists(EVERYTHING, max_size=3),
    only=st.none() | st.sets(st.sampled_from(FIELD_NAMES)),
    exclude=st.sets(st.sampled_from(FIELD_NAMES)),
)
def test_only_exclude_and_many_dump_alike(
    values: list[dict[str, Any]], only: set[str] | None, exclude: set[str]
) -> None:
    schema = Everything(only=only, exclude=exclude, many=True)
    assert_dumps_alike(compile_dumper(schema), schema, values)
    # A None collection is dumped as one object (every value absent), as Marshmallow does.
    assert_dumps_alike(compile_dumper(schema), schema, None)


class Shout(fields.Field[str]):
    """A custom field: only its own ``_serialize`` knows what it writes."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else f"{value}!".upper()


class Trimmed(fields.String):
    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else str(value).strip()


class WithUnknownFields(Schema):
    name = fields.String()
    shout = Shout(attribute="name", dump_only=True)
    trimmed = Trimmed(attribute="name", dump_only=True)
    defaulted = fields.String(dump_default="none given")
    dotted = fields.Integer(attribute="child.number")
    method = fields.Method("describe")
    function = fields.Function(lambda obj: len(obj.get("name") or ""))
    constant = fields.Constant(42)
    after = fields.Integer()

    def describe(self, obj: Any) -> str:
        return f"<{obj.get('name')}>"


@given(
    value=st.fixed_dictionaries(
        {},
        optional={
            "name": maybe(TEXT),
            "defaulted": maybe(TEXT),
            "child": st.fixed_dictionaries({}, optional={"number": st.integers()}),
            "after": st.integers(),
        },
    )
)
def test_fields_it_does_not_know_fall_back_to_their_own_serialize(value: dict[str, Any]) -> None:
    schema = WithUnknownFields()
    assert marshmallow_fallbacks(schema) == (
        "shout",
        "trimmed",
        "defaulted",
        "dotted",
        "method",
        "function",
        "constant",
    )
    assert_dumps_alike(compile_dumper(schema), schema, value)


class Hooked(Schema):
    name = fields.String()

    @pre_dump
    def upper(self, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"name": str(obj.get("name")).upper()}

    @post_dump
    def envelope(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"wrapped": data}


class HoldsHooked(Schema):
    hooked = fields.Nested(Hooked)
    hooked_list = fields.List(fields.Nested(Hooked))
    many_hooked = fields.Nested(Hooked, many=True)


class OverridesAccess(Schema):
    name = fields.String()

    def get_attribute(self, obj: Any, attr: str, default: Any) -> Any:
        return f"always {attr}"


class Tree(Schema):
    label = fields.String()
    children = fields.List(fields.Nested(lambda: Tree()))


TREES = st.recursive(
    st.fixed_dictionaries({"label": TEXT}),
    lambda kids: st.fixed_dictionaries({"label": TEXT, "children": st.lists(kids, max_size=3)}),
    max_leaves=8,
)


@given(name=MAYBE_TEXT, tree=TREES)
def test_schemas_it_does_not_know_fall_back_to_their_own_dump(
    name: str | None, tree: dict[str, Any]
) -> None:
    assert marshmallow_fallbacks(Hooked()) == ("*",)
    assert marshmallow_fallbacks(HoldsHooked()) == (
        "hooked.*",
        "hooked_list[].*",
        "many_hooked.*",
    )
    assert marshmallow_fallbacks(OverridesAccess()) == ("*",)
    # A schema nested in itself is compiled once; below, Marshmallow dumps it.
    assert marshmallow_fallbacks(Tree()) == ("children[].*",)
    item = {"name": name}
    for schema, value in (
        (Hooked(), item),
        (HoldsHooked(), {"hooked": item, "hooked_list": [item, None], "many_hooked": [item]}),
        (OverridesAccess(), item),
        (Tree(), tree),
    ):
        assert_dumps_alike(compile_dumper(schema), schema, value)
