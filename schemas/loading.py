"""Params loading with a fast path compiled once from a ``Params`` schema, deferring to
``Schema.load`` on any doubt.

Where it sits: ``RpcMethod.load_params`` (rpc_server/jsonrpc/registry.py) turns a call's
params, by name, into the handler's keyword arguments with the loader ``compile_loader``
built from the method's params schema when the registry was made.

The fast path handles params that are valid, the common case: a dict whose keys are all
known (unknown keys are errors in a ``Params`` schema), each value of the exact type its
field takes (``String``: a str; ``Integer``: an int, not a bool; ``Enum``: a str naming
or valued as a member, as the field says), passing every validator of the field (the
``Regexp``, ``Length``, ``Range``, ``OneOf`` … and the NUL check ``Params`` adds: the
field's own list, called as Marshmallow calls it). A field of another class is loaded by
its own ``deserialize``, the call ``Schema.load`` makes for it. Then the result is what
``schema.load`` returns: the same keys, in the same order, with the same values.

On any doubt (a value of another type, a validator that raises, a required param left
out, a key the schema does not know, an input that is not a dict) the loader calls
``schema.load`` itself, so a failure raises Marshmallow's own ``ValidationError`` with its
messages, and whatever Marshmallow accepts that the fast path does not (bytes for a
string, a float for a non-strict integer) loads as it always did. A schema with hooks
(``pre_load``, ``post_load``, ``validates``, ``validates_schema``), ``many``, ``partial``,
``unknown=INCLUDE``, a dotted ``attribute`` or its own ``load`` is always loaded by
``schema.load``. tests/unit/test_schema_loading.py proves the two agree on generated
params, valid and invalid, for every params schema of the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from marshmallow import EXCLUDE, RAISE, Schema, fields, missing

Loader = Callable[[Mapping[str, Any]], dict[str, Any]]
# A field's reading of a present raw value (and the whole input): its loaded value, or
# DEFER when only Marshmallow can say.
Parse = Callable[[Any, Mapping[str, Any]], Any]

DEFER: Final = object()
_LOAD_HOOKS = ("pre_load", "post_load", "validates", "validates_schema")
# Methods whose override changes how a schema loads (its own, not Marshmallow's).
_LOAD_METHODS = ("load", "_do_load", "_deserialize", "_invoke_field_validators")


def compile_loader(schema: Schema) -> Loader:
    """A function equal to ``schema.load`` on a mapping of params, built once."""
    plan = _plan(schema)
    if plan is None:
        return _deferring(schema)
    check_unknown = schema.unknown == RAISE
    known = frozenset(data_key for data_key, _, _, _, _ in plan)

    def load(data: Mapping[str, Any]) -> dict[str, Any]:
        if type(data) is not dict or (check_unknown and not known.issuperset(data)):
            return _load(schema, data)
        out: dict[str, Any] = {}
        for data_key, key, parse, required, default in plan:
            raw = data.get(data_key, missing)
            if raw is missing:
                if required:
                    return _load(schema, data)
                if default is missing:
                    continue
                value = default() if callable(default) else default
            else:
                value = parse(raw, data)
                if value is DEFER:
                    return _load(schema, data)
            out[key] = value
        return out

    return load


def has_fast_path(schema: Schema) -> bool:
    """Whether ``compile_loader(schema)`` can load valid params without ``schema.load``."""
    return _plan(schema) is not None


def _load(schema: Schema, data: Mapping[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = schema.load(data)
    return loaded


def _deferring(schema: Schema) -> Loader:
    def load(data: Mapping[str, Any]) -> dict[str, Any]:
        return _load(schema, data)

    return load


def _plan(schema: Schema) -> tuple[tuple[str, str, Parse, bool, Any], ...] | None:
    """Per load field: (input key, output key, parse, required, load_default); None when
    the schema is to be loaded by Marshmallow alone."""
    hooks = type(schema).resolve_hooks()
    own_classes = type(schema).__mro__[: type(schema).__mro__.index(Schema)]
    if (
        schema.many
        or schema.partial is not None
        or schema.unknown not in (RAISE, EXCLUDE)
        or schema.dict_class is not dict
        or any(hooks.get(tag) for tag in _LOAD_HOOKS)
        or any(method in vars(cls) for cls in own_classes for method in _LOAD_METHODS)
    ):
        return None
    plan = []
    for name, field in schema.load_fields.items():
        key = field.attribute or name
        if "." in key:
            return None  # Marshmallow nests the value: set_value
        data_key = field.data_key if field.data_key is not None else name
        parse = _fast_parse(field) or _own_deserialize(field, data_key)
        plan.append((data_key, key, parse, field.required, field.load_default))
    return tuple(plan)


def _own_deserialize(field: fields.Field[Any], data_key: str) -> Parse:
    """What ``Schema.load`` calls for the field; any failure is Marshmallow's to report."""

    def parse(raw: Any, data: Mapping[str, Any]) -> Any:
        try:
            return field.deserialize(raw, data_key, data)
        except Exception:
            return DEFER

    return parse


def _fast_parse(field: fields.Field[Any]) -> Parse | None:
    """The exact-type reading of a field of a known class (its exact class) without
    field-level pre_load/post_load functions, then its validators; or None."""
    if field.pre_load or field.post_load:
        return None
    convert: Callable[[Any], Any]
    if type(field) is fields.String:
        convert = _exactly(str)
    elif type(field) is fields.Integer:
        convert = _exactly(int)  # a bool is not an int here; int(an int) is itself
    elif type(field) is fields.Enum:
        if field.by_value is True:
            table = {member.value: member for member in field.enum}
        elif field.by_value is False:
            table = dict(field.enum.__members__)  # names, aliases included
        else:
            return None
        if not all(type(raw) is str for raw in table):
            return None
        convert = _member_of(table)
    else:
        return None
    validators = tuple(field.validators)
    allow_none = field.allow_none

    def parse(raw: Any, data: Mapping[str, Any]) -> Any:
        if raw is None:
            return None if allow_none else DEFER
        value = convert(raw)
        if value is DEFER:
            return DEFER
        try:
            for validator in validators:
                validator(value)  # Marshmallow's And ignores what they return
        except Exception:
            return DEFER
        return value

    return parse


def _exactly(kind: type[Any]) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        return raw if type(raw) is kind else DEFER

    return convert


def _member_of(table: dict[str, Any]) -> Callable[[Any], Any]:
    """A str key of the table (values or names, all str): ``Enum(value)`` or
    ``Enum[name]`` find the same member; anything else (a member itself, an int, a
    name Marshmallow would have to look up otherwise) is Marshmallow's."""

    def convert(raw: Any) -> Any:
        if type(raw) is str:
            return table.get(raw, DEFER)
        return DEFER

    return convert
