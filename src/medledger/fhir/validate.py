"""FHIR resource validation and canonical form.

This module owns the boundary between untrusted bytes and FHIR resources:

* ``parse_resource`` parses JSON (orjson), validates it against the
  ``fhir.resources.R4B`` pydantic models plus the required code bindings the
  models do not check (``Observation.status``, ``Patient.gender`` ...), and
  returns the canonical JSON dict of the resource: the input as sent, without
  nulls, empty arrays and ``fhir_comments``, after checking that every value has
  its FHIR JSON type (a number for integer/decimal, ``true``/``false`` for
  boolean, a string for the rest).  Values the models accept only by coercion
  (``"5"`` for an integer) fall back to the model's own dump, which writes them
  in FHIR JSON form.  Keeping the input avoids the models' serialiser, which
  costs three times the validation itself (Synthea import speed).
* ``canonical_bytes`` is the one way a resource dict becomes bytes (sorted keys).

Every failure is an :class:`~medledger.errors.InvalidInput` whose message names
the element path and the problem, e.g.
``Observation is invalid: 'bogus' is not a valid code ... at Observation.status``.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from medledger.errors import InvalidInput
from medledger.fhir.narrative import check_resource_content
from medledger.fhir.schema import compile_schema, conformant_copy

__all__ = [
    "MAX_ERRORS",
    "canonical_bytes",
    "parse_json",
    "parse_resource",
    "preload_models",
    "resource_model",
]

MAX_ERRORS = 3
"""How many validation problems a single error message lists."""

_STATUS_CLINICAL = ("active", "completed", "entered-in-error")
_GENDER = frozenset({"male", "female", "other", "unknown"})
_NAME_USE = frozenset({"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"})
_TELECOM_SYSTEM = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
_TELECOM_USE = frozenset({"home", "work", "temp", "old", "mobile"})
_ADDRESS_USE = frozenset({"home", "work", "temp", "old", "billing"})
_ADDRESS_TYPE = frozenset({"postal", "physical", "both"})
_IDENTIFIER_USE = frozenset({"usual", "official", "temp", "secondary", "old"})
_FINANCIAL_STATUS = frozenset({"active", "cancelled", "draft", "entered-in-error"})

_DATATYPE_BINDINGS: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = (
    (("identifier", "use"), _IDENTIFIER_USE),
    (("name", "use"), _NAME_USE),
    (("telecom", "system"), _TELECOM_SYSTEM),
    (("telecom", "use"), _TELECOM_USE),
    (("address", "use"), _ADDRESS_USE),
    (("address", "type"), _ADDRESS_TYPE),
)

# Required code bindings (FHIR R4B) that fhir.resources does not enforce: the
# pydantic models type these elements as plain strings.  Paths walk through
# arrays transparently.
_REQUIRED_BINDINGS: dict[str, tuple[tuple[tuple[str, ...], frozenset[str]], ...]] = {
    "Patient": (
        (("gender",), _GENDER),
        *_DATATYPE_BINDINGS,
        (("contact", "gender"), _GENDER),
        (("link", "type"), frozenset({"replaced-by", "replaces", "refer", "seealso"})),
    ),
    "RelatedPerson": ((("gender",), _GENDER), *_DATATYPE_BINDINGS),
    "Practitioner": ((("gender",), _GENDER), *_DATATYPE_BINDINGS),
    "Person": ((("gender",), _GENDER), *_DATATYPE_BINDINGS),
    "Organization": (*_DATATYPE_BINDINGS,),
    "Observation": (
        (
            ("status",),
            frozenset(
                {
                    "registered",
                    "preliminary",
                    "final",
                    "amended",
                    "corrected",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                }
            ),
        ),
        (("valueQuantity", "comparator"), frozenset({"<", "<=", ">=", ">"})),
    ),
    "Encounter": (
        (
            ("status",),
            frozenset(
                {
                    "planned",
                    "arrived",
                    "triaged",
                    "in-progress",
                    "onleave",
                    "finished",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                }
            ),
        ),
    ),
    "MedicationRequest": (
        (
            ("status",),
            frozenset(
                {
                    "active",
                    "on-hold",
                    "cancelled",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "draft",
                    "unknown",
                }
            ),
        ),
        (
            ("intent",),
            frozenset(
                {
                    "proposal",
                    "plan",
                    "order",
                    "original-order",
                    "reflex-order",
                    "filler-order",
                    "instance-order",
                    "option",
                }
            ),
        ),
        (("priority",), frozenset({"routine", "urgent", "asap", "stat"})),
    ),
    "MedicationStatement": (
        (
            ("status",),
            frozenset(
                {*_STATUS_CLINICAL, "intended", "stopped", "on-hold", "unknown", "not-taken"}
            ),
        ),
    ),
    "MedicationAdministration": (
        (
            ("status",),
            frozenset(
                {
                    "in-progress",
                    "not-done",
                    "on-hold",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "unknown",
                }
            ),
        ),
    ),
    "MedicationDispense": (
        (
            ("status",),
            frozenset(
                {
                    "preparation",
                    "in-progress",
                    "cancelled",
                    "on-hold",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "declined",
                    "unknown",
                }
            ),
        ),
    ),
    "Medication": ((("status",), frozenset({"active", "inactive", "entered-in-error"})),),
    "AllergyIntolerance": (
        (("type",), frozenset({"allergy", "intolerance"})),
        (("category",), frozenset({"food", "medication", "environment", "biologic"})),
        (("criticality",), frozenset({"low", "high", "unable-to-assess"})),
        (("reaction", "severity"), frozenset({"mild", "moderate", "severe"})),
    ),
    "Immunization": ((("status",), frozenset({"completed", "entered-in-error", "not-done"})),),
    "Procedure": (
        (
            ("status",),
            frozenset(
                {
                    "preparation",
                    "in-progress",
                    "not-done",
                    "on-hold",
                    "stopped",
                    "completed",
                    "entered-in-error",
                    "unknown",
                }
            ),
        ),
    ),
    "DiagnosticReport": (
        (
            ("status",),
            frozenset(
                {
                    "registered",
                    "partial",
                    "preliminary",
                    "final",
                    "amended",
                    "corrected",
                    "appended",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                }
            ),
        ),
    ),
    "DocumentReference": (
        (("status",), frozenset({"current", "superseded", "entered-in-error"})),
        (("docStatus",), frozenset({"preliminary", "final", "amended", "entered-in-error"})),
    ),
    "Composition": (
        (("status",), frozenset({"preliminary", "final", "amended", "entered-in-error"})),
    ),
    "CarePlan": (
        (
            ("status",),
            frozenset(
                {
                    "draft",
                    "active",
                    "on-hold",
                    "revoked",
                    "completed",
                    "entered-in-error",
                    "unknown",
                }
            ),
        ),
        (("intent",), frozenset({"proposal", "plan", "order", "option"})),
    ),
    "CareTeam": (
        (
            ("status",),
            frozenset({"proposed", "active", "suspended", "inactive", "entered-in-error"}),
        ),
    ),
    "Goal": (
        (
            ("lifecycleStatus",),
            frozenset(
                {
                    "proposed",
                    "planned",
                    "accepted",
                    "active",
                    "on-hold",
                    "completed",
                    "cancelled",
                    "entered-in-error",
                    "rejected",
                }
            ),
        ),
    ),
    "Claim": (
        (("status",), _FINANCIAL_STATUS),
        (("use",), frozenset({"claim", "preauthorization", "predetermination"})),
    ),
    "ExplanationOfBenefit": (
        (("status",), _FINANCIAL_STATUS),
        (("use",), frozenset({"claim", "preauthorization", "predetermination"})),
        (("outcome",), frozenset({"queued", "complete", "error", "partial"})),
    ),
    "Coverage": ((("status",), _FINANCIAL_STATUS),),
    "Consent": (
        (
            ("status",),
            frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}),
        ),
        (("provision", "type"), frozenset({"deny", "permit"})),
    ),
    "Bundle": (
        (
            ("type",),
            frozenset(
                {
                    "document",
                    "message",
                    "transaction",
                    "transaction-response",
                    "batch",
                    "batch-response",
                    "history",
                    "searchset",
                    "collection",
                }
            ),
        ),
        (
            ("entry", "request", "method"),
            frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}),
        ),
    ),
}


def parse_json(data: bytes | str) -> Any:
    """Parse JSON text with orjson; malformed input raises InvalidInput with its position."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            f"malformed JSON at line {exc.lineno} column {exc.colno} (byte {exc.pos}): {exc.msg}"
        ) from None


@cache
def resource_model(resource_type: str) -> type[FHIRAbstractModel]:
    """The R4B model class of a resource type; InvalidInput if it is not a FHIR R4B resource."""
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, TypeError):
        model = None
    if model is None or not issubclass(model, Resource):
        raise InvalidInput(f"unknown resourceType {resource_type!r}: not a FHIR R4B resource")
    return model


COMMON_RESOURCE_TYPES = (
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
    "DocumentReference",
    "Consent",
    "Bundle",
    # the rest of what Synthea 3.3.0 writes, and the directory types
    "Claim",
    "ExplanationOfBenefit",
    "Provenance",
    "CarePlan",
    "CareTeam",
    "Device",
    "ImagingStudy",
    "Medication",
    "MedicationAdministration",
    "SupplyDelivery",
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
)


def preload_models(resource_types: Sequence[str] = COMMON_RESOURCE_TYPES) -> None:
    """Import and build the model classes and their compiled checks up front: the first
    use of a resource type builds every element model it contains (up to ~0.2 s for a
    Claim), which a worker should do when it starts, not during someone's import."""
    for resource_type in resource_types:
        compile_schema(resource_model(resource_type))


def parse_resource(
    data: bytes | str | Mapping[str, Any], expected_type: str | None = None
) -> dict[str, Any]:
    """Parse and validate one FHIR R4B resource; return its canonical JSON dict.

    ``data`` is JSON text or an already-parsed dict (never mutated).  If
    ``expected_type`` is given, the resource must be of that type.
    """
    raw = parse_json(data) if isinstance(data, bytes | str) else data
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"a FHIR resource must be a JSON object, got {_json_kind(raw)}")
    check_resource_content(raw)  # depth, control characters, narrative XHTML
    resource_type = raw.get("resourceType")
    if resource_type is None:
        raise InvalidInput("missing resourceType: every FHIR resource names its type")
    if not isinstance(resource_type, str):
        raise InvalidInput(f"resourceType must be a string, got {_json_kind(resource_type)}")
    if expected_type is not None and resource_type != expected_type:
        raise InvalidInput(
            f"expected a {expected_type} resource, got resourceType {resource_type!r}"
        )
    model = resource_model(resource_type)
    # certainly valid, common-shape JSON is accepted by the compiled check (fhir.schema);
    # everything else, and every error message, comes from the models
    fast = conformant_copy(raw, model) if type(raw) is dict else None
    problems: list[str] = []
    instance = None
    if fast is None:
        try:
            instance = model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_describe_validation_error(resource_type, exc))
    problems.extend(_check_required_bindings(resource_type, raw))
    if problems:
        shown = "; ".join(problems[:MAX_ERRORS])
        more = len(problems) - MAX_ERRORS
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
        raise InvalidInput(f"{resource_type} is invalid: {shown}{suffix}")
    if fast is not None:
        return fast
    assert instance is not None
    conformant = _conformant_copy(raw, instance)
    if conformant is not None:
        return conformant
    dumped: dict[str, Any] = instance.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude_comments=True
    )
    return dumped


def canonical_bytes(resource: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a resource dict: compact JSON, keys sorted, UTF-8."""
    try:
        return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise InvalidInput(f"resource cannot be encoded as JSON: {exc}") from None


# -- canonical copy -------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The input differs from FHIR JSON where the model coerced it: use the model's dump."""


_ABSENT = object()
_TEXT_TYPES = (str, bytes, date, datetime, time)


@cache
def _json_names(model: type[FHIRAbstractModel]) -> dict[str, str]:
    """JSON property name -> model attribute name (``_status`` -> ``status__ext``)."""
    return {(field.alias or name): name for name, field in model.model_fields.items()}


def _conformant_copy(raw: Mapping[str, Any], instance: FHIRAbstractModel) -> dict[str, Any] | None:
    """A copy of validated ``raw`` without nulls, or None where the model coerced a value."""
    try:
        return _copy_object(raw, instance)
    except _Mismatch:
        return None


def _copy_object(raw: Mapping[str, Any], instance: object) -> dict[str, Any]:
    if not isinstance(instance, FHIRAbstractModel):
        raise _Mismatch
    names = _json_names(type(instance))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or key == "fhir_comments":
            continue
        if key == "resourceType":
            out[key] = value
            continue
        name = names.get(key)
        if name is None:
            raise _Mismatch
        copied = _copy_value(value, getattr(instance, name))
        if copied is not _ABSENT:
            out[key] = copied
    if not out:
        raise _Mismatch
    return out


def _copy_value(value: Any, validated: Any) -> Any:
    if isinstance(value, dict):
        return _copy_object(value, validated)
    if isinstance(value, list):
        if not value:
            return _ABSENT
        if not isinstance(validated, list) or len(validated) != len(value):
            raise _Mismatch
        return [
            None if item is None and check is None else _copy_item(item, check)
            for item, check in zip(value, validated, strict=True)
        ]
    if isinstance(value, bool):
        if not isinstance(validated, bool):
            raise _Mismatch
    elif isinstance(value, int):
        if isinstance(validated, bool) or not isinstance(validated, int | Decimal | float):
            raise _Mismatch
    elif isinstance(value, float):
        if not isinstance(validated, Decimal | float):
            raise _Mismatch
    elif isinstance(value, str):
        if not isinstance(validated, _TEXT_TYPES):
            raise _Mismatch
    else:
        raise _Mismatch
    return value


def _copy_item(item: Any, validated: Any) -> Any:
    copied = _copy_value(item, validated)
    if copied is _ABSENT or item is None:
        raise _Mismatch
    return copied


# -- error descriptions -------------------------------------------------------------------------


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _format_path(resource_type: str, loc: Sequence[int | str]) -> str:
    out = resource_type
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REGEX_KINDS = {
    "DateTime": "dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz)",
    "Date": "date (YYYY, YYYY-MM or YYYY-MM-DD)",
    "Instant": "instant (YYYY-MM-DDThh:mm:ss.sss+zz:zz)",
    "Time": "time (hh:mm:ss)",
    "Decimal": "decimal number",
}


def _describe_one(resource_type: str, err: Mapping[str, Any]) -> str:
    loc: tuple[int | str, ...] = tuple(err.get("loc", ()))
    kind: str = err.get("type", "")
    msg: str = err.get("msg", "")
    value = err.get("input")
    if kind == "fhir-validation-wrong-resource-type":
        return f"resourceType {value!r} does not match the {resource_type} model"
    path = _format_path(resource_type, loc)
    if kind == "missing":
        problem = "required element is missing"
    elif kind == "extra_forbidden":
        problem = f"unknown element {str(loc[-1])!r} (not part of FHIR R4B)"
    elif kind == "json_invalid" or kind in ("model_type", "dict_type", "model_attributes_type"):
        problem = f"must be a JSON object, got {_json_kind(value)} {_short(value)}"
    elif kind == "list_type":
        problem = f"must be an array, got {_json_kind(value)} {_short(value)}"
    elif kind == "string_type":
        problem = f"must be a string, got {_json_kind(value)} {_short(value)}"
    elif kind == "string_pattern_mismatch":
        if loc and loc[-1] == "id":
            problem = f"{_short(value)} is not a valid id (1-64 of A-Z a-z 0-9 - .)"
        elif value == "" or (isinstance(value, str) and not value.strip()):
            problem = "must not be empty or blank"
        else:
            problem = f"{_short(value)} does not match the FHIR format"
    elif kind == "string_too_long":
        problem = f"is too long ({msg.lower()})"
    elif kind == "value_error" and "does not match spec regex" in msg:
        prim = msg.removeprefix("Value error, ").split(" value string", 1)[0]
        expected = _REGEX_KINDS.get(prim, prim)
        problem = f"{_short(value)} is not a valid FHIR {expected}"
    elif kind == "value_error" and "Any of one field value is expected" in msg:
        choices = msg.split("list ", 1)[-1].split("]", 1)[0] + "]"
        problem = f"only one of the choice elements {choices} may be present"
    else:
        text = msg.removeprefix("Value error, ")
        problem = f"{text[0].lower() + text[1:] if text else kind} (got {_short(value)})"
    return f"{problem} at {path}"


def _describe_validation_error(resource_type: str, exc: ValidationError) -> list[str]:
    return [_describe_one(resource_type, err) for err in exc.errors(include_url=False)]


def _values_at(node: object, path: Sequence[str], loc: str) -> Iterator[tuple[str, object]]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _values_at(item, path, f"{loc}[{i}]")
        return
    if not path:
        yield loc, node
        return
    if isinstance(node, Mapping) and path[0] in node:
        yield from _values_at(node[path[0]], path[1:], f"{loc}.{path[0]}")


def _check_required_bindings(resource_type: str, raw: Mapping[str, Any],
                             where: str | None = None) -> list[str]:
    """Required code bindings of ``raw`` and of the resources it contains."""
    where = where or resource_type
    problems: list[str] = []
    for path, allowed in _REQUIRED_BINDINGS.get(resource_type, ()):
        for loc, value in _values_at(raw, path, where):
            if isinstance(value, str) and value not in allowed:
                choices = ", ".join(sorted(allowed))
                problems.append(
                    f"{_short(value)} is not a valid code (expected one of: {choices}) at {loc}"
                )
    contained = raw.get("contained")
    if isinstance(contained, list):
        for i, inner in enumerate(contained):
            if isinstance(inner, Mapping) and isinstance(inner.get("resourceType"), str):
                problems.extend(_check_required_bindings(
                    inner["resourceType"], inner, f"{where}.contained[{i}]"))
    return problems
