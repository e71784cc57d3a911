"""Result dumping compiled once from an ``Out`` schema: ``Schema.dump`` without its per-call walk.

Where it sits: a method's handler returns a record; ``RpcMethod.dump_result``
(rpc_server/jsonrpc/registry.py) turns it into the JSON-ready result with the dumper
``compile_dumper`` built from the method's result schema when the registry was made.

``Schema.dump`` walks the schema's ``dump_fields`` on every call, and for every field
goes through ``Field.serialize``, ``Field.get_value``, the schema's accessor and the
field's own ``_serialize``. ``compile_dumper`` walks ``dump_fields`` once and keeps, per
field, only the output key, the attribute to read and a small conversion for the field's
class (``String``, ``Integer``, ``Float``, ``Decimal``, ``Boolean``, ``Raw``, ``Enum``,
``DateTime``, ``Dict`` without key or value fields, ``Nested``, ``List`` of those). The
schema stays the single source of truth: the dumper is derived from its fields and their
public attributes (``attribute``, ``data_key``, ``places``, ``as_string``, ``by_value``,
``format``, ``schema``, ``inner`` …), never written a second time.

The output equals ``schema.dump(value)``: the same keys in the same order, the same
values of the same types (tests/unit/test_schema_dumping.py proves it on generated
records for every result schema of the registry). It keeps Marshmallow's semantics: a
value is read as ``marshmallow.utils.get_value`` reads it (by key from anything with
``__getitem__``, else by attribute), an absent value leaves its key out, ``None`` dumps as
``None`` whatever the field. Correct first, fast where it is safe: a field it does not
know (a custom field such as ``schemas.fields.Cursor``, ``Method``, ``Function``, a
subclass of a known field, a ``dump_default``, a dotted attribute) is dumped by that
field's own ``serialize``; a schema it does not know (``pre_dump``/``post_dump`` hooks, a
``dict_class`` other than ``dict``, an overridden ``dump``/``get_attribute``) by its own
``dump``. ``marshmallow_fallbacks`` lists which parts fall back.

A dumper reflects the schema as it was compiled: a schema changed afterwards (its
``only``, its fields) needs a new one.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from functools import partial
from typing import Any

from marshmallow import Schema, fields, missing
from marshmallow.utils import get_value

Dumper = Callable[[Any], Any]
# A field's conversion of a value that is neither None nor missing.
Convert = Callable[[Any], Any]

# Methods whose override changes how a schema dumps; a schema class that defines any of
# them (its own, not Marshmallow's) is dumped by its own ``dump``.
_DUMP_METHODS = ("dump", "_serialize", "get_attribute")


def compile_dumper(schema: Schema) -> Dumper:
    """A function equal to ``schema.dump`` (with the schema's own ``many``), built once."""
    return _Compiler().dumper(schema)


def marshmallow_fallbacks(schema: Schema) -> tuple[str, ...]:
    """What the compiled dumper hands back to Marshmallow: dotted field paths (a field's
    own ``serialize``) and schema paths ending in ``*`` (the schema's own ``dump``)."""
    compiler = _Compiler()
    compiler.dumper(schema)
    return tuple(compiler.fallbacks)


def _text(value: Any) -> str:
    """``String``: ``marshmallow.utils.ensure_text_type``."""
    if type(value) is str:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _same(value: Any) -> Any:
    """``Raw`` and ``Boolean`` write the value as it is."""
    return value


def _enum_part(enum_class: type[Any], part: Callable[[Any], Any]) -> Convert:
    """A member's ``name`` or ``value``, looked up in a table made once: reading either
    off a member goes through a Python-level descriptor on every call."""
    table = {member: part(member) for member in enum_class}

    def convert(value: Any) -> Any:
        # The exact class, not equality: a StrEnum member equals (and hashes as) its
        # value, which has no ``.value`` of its own.
        if type(value) is enum_class:
            try:
                return table[value]
            except KeyError:  # a member made on the fly: a combination of Flag members
                pass
        return part(value)

    return convert


def _name(member: Any) -> str | None:
    # By name, Marshmallow writes it through a String field (an empty Flag has no name).
    name = member.name
    return None if name is None else _text(name)


def _value(member: Any) -> Any:
    return member.value


def _decimal(field: fields.Decimal) -> Convert:
    """``Decimal._format_num`` then ``_to_string``: quantized in the caller's decimal
    context (its rounding when the field names none), as Marshmallow does."""
    places, rounding, allow_nan, as_string = (
        field.places,
        field.rounding,
        field.allow_nan,
        field.as_string,
    )
    nan = decimal.Decimal("NaN")

    def convert(value: Any) -> Any:
        # A Decimal's str() round-trips exactly (sign, exponent, NaN payload).
        num = value if type(value) is decimal.Decimal else decimal.Decimal(str(value))
        if allow_nan and num.is_nan():
            num = nan  # Marshmallow's: no sNaN, -sNaN or -NaN
        elif places is not None and num.is_finite():
            num = num.quantize(places, rounding=rounding)
        return format(num, "f") if as_string else num

    return convert


def _number(kind: type[int] | type[float], as_string: bool) -> Convert:
    if not as_string:
        return kind

    def convert(value: Any) -> str:
        return str(kind(value))

    return convert


def _datetime(field: fields.DateTime) -> Convert:
    data_format = field.format or field.DEFAULT_FORMAT
    known = field.SERIALIZATION_FUNCS.get(data_format)
    if known is not None:
        return known

    def convert(value: Any) -> Any:
        return value.strftime(data_format)

    return convert


def _each(convert: Convert) -> Convert:
    """``List``: each item converted by the inner field, ``None`` items left as ``None``."""

    def convert_each(value: Any) -> list[Any]:
        return [None if item is None else convert(item) for item in value]

    return convert_each


def _dump_each(dump: Dumper, value: Any) -> list[Any]:
    return [dump(item) for item in value]


def _or_none(convert: Convert) -> Convert:
    def convert_or_none(value: Any) -> Any:
        return None if value is None else convert(value)

    return convert_or_none


class _Compiler:
    """One compilation: the schema classes on the current path (a schema nested in itself
    is left to Marshmallow rather than compiled forever) and what fell back."""

    def __init__(self) -> None:
        self.fallbacks: list[str] = []
        self._path: list[type[Schema]] = []

    def dumper(self, schema: Schema, where: str = "") -> Dumper:
        one = self._object_dumper(schema, where)
        if one is None:
            return schema.dump
        if not schema.many:
            return one

        def dump_many(obj: Any) -> Any:
            # As Schema.dump: a None collection is dumped as one object.
            return one(obj) if obj is None else [one(item) for item in obj]

        return dump_many

    def _object_dumper(self, schema: Schema, where: str) -> Dumper | None:
        schema_class = type(schema)
        if not self._dumps_plainly(schema) or schema_class in self._path:
            self.fallbacks.append(f"{where}*")
            return None
        self._path.append(schema_class)
        try:
            entries = [
                self._entry(schema, name, field, where)
                for name, field in schema.dump_fields.items()
            ]
        finally:
            self._path.pop()
        plan = tuple(entries)
        no_value = missing

        def dump(obj: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            # What marshmallow.utils.get_value does per field, decided once per object.
            fetch = get_value if hasattr(obj, "__getitem__") else getattr
            for key, attribute, convert in plan:
                if attribute is None:  # the field's own serialize, given the object
                    value = convert(obj)
                    if value is no_value:
                        continue
                else:
                    value = fetch(obj, attribute, no_value)
                    if value is no_value:
                        continue
                    if value is not None:
                        value = convert(value)
                out[key] = value
            return out

        return dump

    @staticmethod
    def _dumps_plainly(schema: Schema) -> bool:
        if schema.dict_class is not dict:
            return False
        hooks = type(schema).resolve_hooks()
        if hooks.get("pre_dump") or hooks.get("post_dump"):
            return False
        own_classes = type(schema).__mro__[: type(schema).__mro__.index(Schema)]
        return not any(method in vars(cls) for cls in own_classes for method in _DUMP_METHODS)

    def _entry(
        self, schema: Schema, name: str, field: fields.Field[Any], where: str
    ) -> tuple[str, str | None, Convert]:
        """(output key, attribute to read, its conversion); or (output key, None, the
        field's own ``serialize`` of the object)."""
        key = field.data_key if field.data_key is not None else name
        attribute = field.attribute if field.attribute is not None else name
        convert = None
        if field.dump_default is missing and "." not in attribute:
            convert = self._convert(field, f"{where}{name}")
        if convert is None:
            self.fallbacks.append(f"{where}{name}")
            return key, None, partial(field.serialize, name, accessor=schema.get_attribute)
        return key, attribute, convert

    def _convert(self, field: fields.Field[Any], where: str) -> Convert | None:
        """The conversion of a non-None value by a field of a known class (its exact
        class: a subclass may serialize otherwise), or None."""
        if type(field) is fields.String:
            return _text
        if type(field) is fields.Integer:
            return _number(int, field.as_string)
        if type(field) is fields.Float:
            return _number(float, field.as_string)
        if type(field) is fields.Decimal:
            return _decimal(field)
        if type(field) is fields.Boolean or type(field) is fields.Raw:
            return _same
        if type(field) is fields.DateTime:
            return _datetime(field)
        if type(field) is fields.Enum:
            return self._enum(field, where)
        if type(field) is fields.Dict:
            if field.key_field is None and field.value_field is None:
                return dict
            return None
        if type(field) is fields.Nested:
            return self._nested(field, where)
        if type(field) is fields.List:
            inner = self._convert(field.inner, f"{where}[]")
            return None if inner is None else _each(inner)
        return None

    def _nested(self, field: fields.Nested, where: str) -> Convert:
        """``Nested``: its schema's dump, with the schema's or the field's ``many``."""
        schema = field.schema
        many = bool(schema.many or field.many)
        one = self._object_dumper(schema, f"{where}.")
        if one is None:
            return partial(schema.dump, many=many)
        if many:  # as Schema.dump(many=True): a None item is dumped as an object
            return partial(_dump_each, one)
        return one

    def _enum(self, field: fields.Enum[Any], where: str) -> Convert | None:
        if field.by_value is False:
            return _enum_part(field.enum, _name)
        if field.by_value is True:
            return _enum_part(field.enum, _value)
        # by_value is a field: the member's value dumped by it (a None value stays None).
        inner = self._convert(field.field, f"{where}.value")
        if inner is None:
            return None
        value_of = _or_none(inner)

        def convert(value: Any) -> Any:
            return value_of(value.value)

        return convert
