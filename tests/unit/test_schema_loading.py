"""The compiled params loader (schemas/loading.py) against ``Schema.load``.

On generated params, valid and invalid, for every params schema of the registry: the
loader returns what ``schema.load`` returns (the same keys in the same order, the same
values of the same types), or raises the ``ValidationError`` it raises, with the same
messages. Valid params of the hot methods never reach ``schema.load``.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Mapping
from itertools import takewhile
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from marshmallow import EXCLUDE, INCLUDE, Schema, ValidationError, fields, post_load, validate

from rpc_server.domain.records import SignedPayment
from rpc_server.domain.states import PurchaseState
from rpc_server.methods import REGISTRY
from schemas.loading import compile_loader, has_fast_path


def outcome(load: Callable[[Any], Any], data: Any) -> tuple[str, Any]:
    try:
        return "loaded", load(data)
    except ValidationError as exc:
        return "invalid", exc.messages
    except Exception as exc:  # a field's own function failing: the same failure
        return "raised", (type(exc), str(exc))


def assert_loads_alike(loader: Callable[[Any], Any], schema: Schema, data: Any) -> None:
    mine, theirs = outcome(loader, data), outcome(schema.load, data)
    assert mine == theirs
    if mine[0] == "loaded":
        assert list(mine[1]) == list(theirs[1])  # the same order
        for key, value in theirs[1].items():
            assert type(mine[1][key]) is type(value), key


def encode_cursor(keyset: int) -> str:
    return base64.urlsafe_b64encode(f"p{keyset}".encode()).decode().rstrip("=")


STATES = [state.value for state in PurchaseState]
# What a client may send that is not right: other JSON types, NUL and control characters,
# names where values are expected, values just out of range, and (by position, from
# Python) bytes and enum members.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.sampled_from(["", "\x00", "a\x00b", "ABC", "abc\n", "PENDING", "0", "101", "p1"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=4),
    st.sampled_from(PurchaseState),
)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "purchase_id": st.from_regex(r"[0-9a-z]{1,64}", fullmatch=True),
    "course": st.text(min_size=1, max_size=100),
    "idempotency_key": st.text(min_size=1, max_size=64),
    "state": st.sampled_from(STATES),
    "purchase_state": st.sampled_from(STATES),
    "limit": st.integers(1, 100),
    "cursor": st.builds(encode_cursor, st.integers(0, 2**63 - 1)),
    "error_msg": st.text(max_size=1000),
    "since": st.integers(0, 2**63 - 1),
    "subscription": st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
    "token": st.text(min_size=1, max_size=256),
    "payment_proof": st.fixed_dictionaries(
        {
            "id": st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True),
            "timestamp": st.integers(0, 2**53),
            "signature": st.text(min_size=1, max_size=20),
            "payload": st.text(min_size=1, max_size=20),
        }
    ),
}
PARAMS_SCHEMAS = sorted(REGISTRY.methods)


def params_for(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """Each param absent, valid or junk; now and then a key the schema does not know."""
    names = list(schema.load_fields)
    for name in names:
        assert name in VALID, f"no generated values for {name}: add them to VALID"
    known = st.fixed_dictionaries(
        {}, optional={name: st.one_of(VALID[name], VALID[name], JUNK) for name in names}
    )
    unknown = st.dictionaries(
        st.text(max_size=8).filter(lambda key: key not in names), JUNK, max_size=1
    )
    return st.builds(lambda a, b: {**a, **b}, known, st.just({}) | unknown)


@pytest.mark.parametrize("method_name", PARAMS_SCHEMAS)
@given(data=st.data())
def test_the_registry_loads_params_as_their_schema_does(
    method_name: str, data: st.DataObject
) -> None:
    method = REGISTRY.methods[method_name]
    schema = method.params_schema
    params = data.draw(params_for(schema))
    assert_loads_alike(lambda p: method.load_params([], p), schema, params)
    # By position, in declaration order, as the registry maps them.
    names = list(schema.load_fields)
    args = [params[name] for name in takewhile(params.__contains__, names)]
    by_name = dict(zip(names, args, strict=False))
    assert_loads_alike(lambda _: method.load_params(args, {}), schema, by_name)


@pytest.mark.parametrize(
    "data", [[], "purchase_id", None, MappingProxyType({"purchase_id": "abc"}), {1: "x"}]
)
def test_input_that_is_not_a_dict_of_params_is_marshmallows(data: Any) -> None:
    schema = REGISTRY.methods["purchase.get"].params_schema
    assert_loads_alike(compile_loader(schema), schema, data)


def refusing_load(schema: Schema) -> Callable[[Any], Any]:
    """A loader of ``schema`` whose ``schema.load`` fails the test if called."""
    loader = compile_loader(schema)

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the fast path deferred to Schema.load")

    schema.load = no_load
    return loader


@given(
    purchase_id=VALID["purchase_id"],
    state=st.none() | VALID["state"],
    limit=st.none() | VALID["limit"],
    cursor=st.none() | VALID["cursor"],
)
def test_valid_params_of_the_hot_methods_never_reach_schema_load(
    purchase_id: str, state: str | None, limit: int | None, cursor: str | None
) -> None:
    for name in ("purchase.get", "purchase.events"):
        schema = type(REGISTRY.methods[name].params_schema)()
        expected = schema.load({"purchase_id": purchase_id})
        assert refusing_load(schema)({"purchase_id": purchase_id}) == expected
    optional = {"state": state, "limit": limit, "cursor": cursor}
    params = {key: value for key, value in optional.items() if value is not None}
    for name in ("purchase.list", "registration.list"):
        schema = type(REGISTRY.methods[name].params_schema)()
        given_params = {key: value for key, value in params.items() if key in schema.fields}
        expected = schema.load(given_params)
        assert refusing_load(schema)(given_params) == expected
    assert all(
        has_fast_path(REGISTRY.methods[name].params_schema)
        for name in (
            "purchase.get",
            "purchase.list",
            "purchase.create",
            "purchase.fulfill",
            "registration.list",
        )
    )


@given(
    purchase_id=VALID["purchase_id"],
    purchase_state=st.sampled_from(["fulfilled", "failed", "canceled"]),
    error_msg=st.none() | st.text("abc XYZ.é", max_size=50),
    payment_proof=st.none()
    | st.fixed_dictionaries(
        {
            "id": st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True),
            "timestamp": st.integers(0, 2**53),
            "signature": st.text("v1,abc=+/ ", min_size=1, max_size=20),
            "payload": st.text('{}":, aé✓', min_size=1, max_size=20),
        }
    ),
)
def test_valid_fulfil_params_never_reach_schema_load(
    purchase_id: str, purchase_state: str, error_msg: str | None, payment_proof: Any
) -> None:
    """The proof is loaded as the SignedPayment it carries by its field (not a schema
    hook), so valid params of purchase.fulfill, a proof among them, stay on the fast path."""
    optional = {"error_msg": error_msg, "payment_proof": payment_proof}
    params = {
        "purchase_id": purchase_id,
        "purchase_state": purchase_state,
        **{key: value for key, value in optional.items() if value is not None},
    }
    schema = type(REGISTRY.methods["purchase.fulfill"].params_schema)()
    expected = schema.load(params)
    assert refusing_load(schema)(params) == expected
    if payment_proof is not None:
        assert isinstance(expected["payment_proof"], SignedPayment)


def test_schemas_with_hooks_are_loaded_by_marshmallow_alone() -> None:
    assert not has_fast_path(PostLoaded())

    class Included(Schema):
        class Meta:
            unknown = INCLUDE

        name = fields.String()

    class Dotted(Schema):
        name = fields.String(attribute="person.name")

    for schema in (Included(), Dotted(), REGISTRY.methods["course.list"].params_schema):
        assert has_fast_path(schema) == (type(schema).__name__ == "CourseListParams")


# --- every field class the fast path knows, and the rest -----------------------------


class Shade(enum.Enum):
    LIGHT = "light"
    PALE = "light"  # an alias: both find LIGHT
    DARK = "dark"


class Numbered(enum.Enum):
    ONE = 1


def tag_list() -> list[str]:
    return ["none"]


class Assorted(Schema):
    class Meta:
        unknown = EXCLUDE

    text = fields.String(validate=validate.Length(max=3), allow_none=True)
    shown = fields.String(data_key="Shown", attribute="kept")
    strict_count = fields.Integer(strict=True, validate=validate.Range(min=0))
    loose_count = fields.Integer(load_default=7)  # "5" and 5.0 load too: Marshmallow's
    shade = fields.Enum(Shade, validate=validate.OneOf([Shade.LIGHT]))
    shade_value = fields.Enum(Shade, by_value=True, required=True)
    numbered = fields.Enum(Numbered, by_value=True)  # int values: Marshmallow's
    flag = fields.Boolean()  # its own deserialize
    tags = fields.List(fields.String(), load_default=tag_list)
    checked = fields.String(validate=lambda value: value != "no")  # False is not a failure
    trimmed = fields.String(pre_load=[str.strip])


ASSORTED_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": st.none() | st.text(max_size=4),
    "Shown": st.text(max_size=3),
    "strict_count": st.integers(-2, 2),
    "loose_count": st.integers() | st.sampled_from(["5", 5.0, "x"]),
    "shade": st.sampled_from(["LIGHT", "PALE", "DARK", "light"]),
    "shade_value": st.sampled_from(["light", "dark", "LIGHT"]),
    "numbered": st.sampled_from([1, "1", 1.0, True]),
    "flag": st.sampled_from([True, "yes", "maybe", 0]),
    "tags": st.lists(st.text(max_size=2), max_size=2),
    "checked": st.sampled_from(["yes", "no"]),
    "trimmed": st.text(max_size=3),
    "other": st.integers(),  # unknown: excluded
}


@given(
    params=st.fixed_dictionaries(
        {},
        optional={key: st.one_of(values, values, JUNK) for key, values in ASSORTED_VALUES.items()},
    )
)
# Only the required param: the others' load_default (a callable one called).
@example(params={"shade_value": "dark"})
def test_every_field_class_loads_as_marshmallow_does(params: dict[str, Any]) -> None:
    schema = Assorted()
    assert has_fast_path(schema)
    assert_loads_alike(compile_loader(schema), schema, params)


class PostLoaded(Schema):
    name = fields.String()

    @post_load
    def upper(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"name": str(data.get("name")).upper()}


@given(params=st.fixed_dictionaries({}, optional={"name": st.text() | JUNK}))
def test_a_hooked_schema_loads_through_its_own_load(params: Mapping[str, Any]) -> None:
    schema = PostLoaded()
    assert not has_fast_path(schema)
    assert_loads_alike(compile_loader(schema), schema, params)
