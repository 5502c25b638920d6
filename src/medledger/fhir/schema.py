"""A fast acceptance check for FHIR R4B JSON, compiled from the fhir.resources models.

This module owns :func:`conformant_copy`: given a resource dict, either return its
copy (the input as sent) because it is certainly valid, or ``None`` to say "not sure:
ask fhir.resources". It never accepts what the models would refuse, so
:func:`medledger.fhir.validate.parse_resource` can try it first and keep the models
(and their exact error messages) for whatever it does not accept.

Why: the models validate every nested element through Python callbacks and cost
~1 ms per Synthea resource, the largest single cost of an import. Here the element
tree of each model class (JSON names, arrays, element types, required elements,
``value[x]`` choice groups) is compiled once from the models' own field definitions,
and a single walk checks a resource against it; each primitive value is checked by
the model's own pydantic type (``TypeAdapter`` over the same annotated type, so the
same regexes and date rules), memoised per value, with a shortcut for canonical
RFC 3339 date-times.

Conservative by construction — anything outside the common shape falls back:
nulls, empty arrays, ``_element`` primitive extensions, ``fhir_comments``, values
the models would only accept by coercion (``"5"`` for an integer, a JSON string for
an element) and unknown element names.
"""

from __future__ import annotations

import datetime as dt
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import TypeAdapter, ValidationError

__all__ = ["compile_schema", "conformant_copy"]

_MAX_MEMO = 200_000  # memoised primitive values per type, before the memo is cleared


class _Unsure(Exception):
    """Not certainly valid: let fhir.resources decide."""


@dataclass(frozen=True, slots=True)
class _Field:
    many: bool
    kind: str  # "model" | "resource" | "primitive" | "unsupported"
    model: type[FHIRAbstractModel] | None = None
    check: Callable[[Any], bool] | None = None


@dataclass(frozen=True, slots=True)
class _Schema:
    resource_type: str | None
    fields: Mapping[str, _Field]  # JSON name -> field
    required: tuple[str, ...]  # JSON names that must be present
    choices: tuple[tuple[tuple[str, ...], bool], ...]  # value[x] groups, required?


def conformant_copy(raw: Mapping[str, Any], model: type[FHIRAbstractModel]
                    ) -> dict[str, Any] | None:
    """A copy of ``raw`` if it is certainly a valid ``model`` (a resource), else None."""
    try:
        return _object(raw, _schema(model))
    except _Unsure:
        return None


def compile_schema(model: type[FHIRAbstractModel]) -> None:
    """Build the checks of ``model`` and of every element model it contains, now."""
    pending, seen = [model], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for field in _schema(current).fields.values():
            if field.model is not None:
                pending.append(field.model)


# -- the walk ---------------------------------------------------------------------------------


def _object(raw: Any, schema: _Schema) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Unsure
    out: dict[str, Any] = {}
    fields = schema.fields
    for key, value in raw.items():
        if key == "resourceType":
            if value != schema.resource_type:
                raise _Unsure
            out[key] = value
            continue
        field = fields.get(key)
        if field is None or value is None:
            raise _Unsure
        if field.many:
            if type(value) is not list or not value:
                raise _Unsure
            out[key] = [_value(field, item) for item in value]
        else:
            out[key] = _value(field, value)
    for name in schema.required:
        if name not in out:
            raise _Unsure
    for group, required in schema.choices:
        present = sum(1 for name in group if name in out)
        if present > 1 or (required and not present):
            raise _Unsure
    return out


def _value(field: _Field, value: Any) -> Any:
    kind = field.kind
    if kind == "primitive":
        assert field.check is not None
        if value is None or not field.check(value):
            raise _Unsure
        return value
    if kind == "model":
        assert field.model is not None
        return _object(value, _schema(field.model))
    if kind == "resource":
        if type(value) is not dict or type(value.get("resourceType")) is not str:
            raise _Unsure
        return _object(value, _schema(_resource_class(value["resourceType"])))
    raise _Unsure


# -- compiling a model class ------------------------------------------------------------------


@cache
def _resource_class(resource_type: str) -> type[FHIRAbstractModel]:
    from medledger.fhir.validate import resource_model  # the one place that names R4B

    try:
        return resource_model(resource_type)
    except Exception:
        raise _Unsure from None


@cache
def _schema(model: type[FHIRAbstractModel]) -> _Schema:
    fields: dict[str, _Field] = {}
    required: list[str] = []
    groups: dict[str, tuple[list[str], bool]] = {}
    for name, info in model.model_fields.items():
        json_name = info.alias or name
        if name == "fhir_comments" or name.endswith("__ext"):
            continue  # present in the input -> unknown here -> the models decide
        fields[json_name] = _field(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if info.is_required() or extra.get("element_required"):
            required.append(json_name)
        group = extra.get("one_of_many")
        if isinstance(group, str):
            members, _ = groups.setdefault(group, ([], bool(extra.get("one_of_many_required"))))
            members.append(json_name)
    resource_type = getattr(model, "__resource_type__", None)
    is_resource = bool(getattr(model, "has_resource_base", lambda: False)())
    return _Schema(resource_type if is_resource else None, fields, tuple(required),
                   tuple((tuple(m), r) for m, r in groups.values()))


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field(annotation: Any) -> _Field:
    inner = _strip_optional(annotation)
    many = typing.get_origin(inner) is list
    if many:
        inner = _strip_optional(typing.get_args(inner)[0])
    getter = getattr(inner, "get_model_klass", None)
    if getter is not None:
        model = getter()
        if model.__name__ == "Resource":
            return _Field(many, "resource")
        return _Field(many, "model", model=model)
    if inner is bool:
        return _Field(many, "primitive", check=_is_bool)
    if typing.get_origin(inner) is typing.Annotated:
        return _Field(many, "primitive", check=_primitive(inner))
    return _Field(many, "unsupported")


def _is_bool(value: Any) -> bool:
    return type(value) is bool


# -- primitives -------------------------------------------------------------------------------

# Canonical RFC 3339 date-times (what Synthea and most servers write), checked with
# datetime.fromisoformat; anything else goes through the model's own type.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_FULL_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def _primitive(annotation: Any) -> Callable[[Any], bool]:
    base, *markers = typing.get_args(annotation)
    marker = type(markers[-1]).__name__ if markers else ""
    adapter = TypeAdapter(annotation)
    pattern = getattr(type(markers[-1]), "pattern", None) if markers else None
    json_type: tuple[type, ...]
    if base in (int,):
        json_type = (int,)
    elif marker == "Decimal":
        json_type = (int, float)
    else:
        json_type = (str,)
    memo: dict[Any, bool] = {}

    def through_model(value: Any) -> bool:
        try:
            adapter.validate_python(value)
        except (ValidationError, ValueError, TypeError):
            return False
        return True

    def check(value: Any) -> bool:
        if type(value) not in json_type:  # exact JSON types: no bool for int, no "5"
            return False
        key = (type(value), value)
        known = memo.get(key)
        if known is not None:
            return known
        if marker in ("DateTime", "Instant") and _RFC3339.fullmatch(value) and \
                pattern is not None and pattern.fullmatch(value):
            ok = _parses(dt.datetime.fromisoformat, value.replace("Z", "+00:00"))
        elif marker == "Date" and _FULL_DATE.fullmatch(value) and \
                pattern is not None and pattern.fullmatch(value):
            ok = _parses(dt.date.fromisoformat, value)
        else:
            ok = through_model(value)
        if len(memo) > _MAX_MEMO:
            memo.clear()
        memo[key] = ok
        return ok

    return check


def _parses(parse: Callable[[str], Any], value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True
