"""Index values of a resource: every search parameter's FHIRPath expression, evaluated
and turned into typed values as FHIR search defines them.

``fhirpathpy`` is the reference evaluator; simple expressions run through
``fastpath`` (same answers, proven by a differential test, ~50x faster). Values:

- string: (normalised, exact) for each string, and each part of HumanName/Address
- token: (system, code) of Coding/CodeableConcept/Identifier/ContactPoint/code/boolean,
  plus display and text words for ``:text``
- date: [low, high) in ms (UTC) for date/dateTime/instant/Period/Timing
- number, quantity (value, system, code-or-unit), reference (type, id), uri
- composite: (component-1 token, component-2 typed value) pairs taken from one element
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

from medledger.search import fastpath
from medledger.search.registry import SPECIAL, Component, SearchParam, registry
from medledger.search.values import (
    MAX_MS,
    MIN_MS,
    date_range,
    decimal_of,
    normalize,
    parse_reference,
)

Evaluator = Callable[[Any], list[Any]]
_MODEL = models["r4"]
COMPOSITE_SECOND = ("token", "quantity", "date", "string")


@dataclass
class Extracted:
    """Every index value of one resource, by table."""

    strings: list[tuple[str, str, str]] = field(default_factory=list)  # code, norm, exact
    tokens: list[tuple[str, str, str]] = field(default_factory=list)  # code, system, value
    texts: list[tuple[str, str]] = field(default_factory=list)  # code, normalised text
    dates: list[tuple[str, int, int]] = field(default_factory=list)  # code, low, high
    numbers: list[tuple[str, float]] = field(default_factory=list)
    quantities: list[tuple[str, float, str, str]] = field(default_factory=list)  # v, sys, code
    refs: list[tuple[str, str, str]] = field(default_factory=list)  # code, type, id
    uris: list[tuple[str, str]] = field(default_factory=list)
    # code, c1 system, c1 code, c2 kind, c2 a (system/""), c2 b (code/norm), c2 lo, c2 hi
    composites: list[tuple[str, str, str, str, str, str, float, float]] = field(
        default_factory=list)


# ------------------------------------------------------------------ evaluators

def reference_evaluator(path: str, start: str, relative: bool = False) -> Evaluator:
    """fhirpathpy, compiled once, on the R4 model."""
    if relative:
        raise ValueError("relative expressions need the fast path or an indexed context")
    compiled = fhirpathpy.compile(path, _MODEL)

    def evaluate(resource: Any) -> list[Any]:
        return list(compiled(resource, {}))

    return evaluate


@cache
def evaluator(path: str, start: str, fast: bool = True) -> Evaluator:
    """The evaluator for ``path`` on a ``start`` resource: fast when it can be."""
    if fast:
        compiled = fastpath.compile_path(path, start)
        if compiled is not None:
            return compiled
    return reference_evaluator(path, start)


# ------------------------------------------------------------------ conversions

def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in ("family", "city", "district", "state", "postalCode", "country", "text"):
            v = value.get(key)
            if isinstance(v, str):
                yield v
        for key in ("given", "prefix", "suffix", "line"):
            for v in value.get(key) or ():
                if isinstance(v, str):
                    yield v


def _tokens(value: Any) -> Iterable[tuple[str, str, str]]:
    """(system, code, text) of a token-typed value; text may be empty."""
    if isinstance(value, dict):
        if "coding" in value or ("text" in value and "value" not in value
                                 and "code" not in value):
            for coding in value.get("coding") or ():
                if isinstance(coding, dict):
                    yield from _coding(coding)
            if isinstance(value.get("text"), str):
                yield "", "", value["text"]
        elif "value" in value and "code" not in value:  # Identifier, ContactPoint
            system, v, kind = value.get("system"), value.get("value"), value.get("type")
            text = kind.get("text") if isinstance(kind, dict) else None
            if isinstance(v, str):
                yield (system if isinstance(system, str) else ""), v, (
                    text if isinstance(text, str) else "")
        else:
            yield from _coding(value)
    elif isinstance(value, bool):
        yield "", "true" if value else "false", ""
    elif isinstance(value, str):
        yield "", value, ""
    elif isinstance(value, int | float) or decimal_of(value) is not None:
        yield "", str(value), ""


def _coding(coding: dict[str, Any]) -> Iterable[tuple[str, str, str]]:
    code, system, display = coding.get("code"), coding.get("system"), coding.get("display")
    if isinstance(code, str):
        yield (system if isinstance(system, str) else ""), code, (
            display if isinstance(display, str) else "")
    elif isinstance(display, str):
        yield "", "", display


def _dates(value: Any) -> Iterable[tuple[int, int]]:
    if isinstance(value, str):
        r = date_range(value)
        if r is not None:
            yield r
    elif isinstance(value, dict):
        if "start" in value or "end" in value:  # Period: open ends are unbounded
            lo = date_range(str(value["start"])) if "start" in value else None
            hi = date_range(str(value["end"])) if "end" in value else None
            if (lo is not None or "start" not in value) and (hi is not None or
                                                             "end" not in value):
                start, end = (lo[0] if lo else MIN_MS), (hi[1] if hi else MAX_MS)
                yield min(start, end), max(start, end)  # an end before its start: reversed
        for event in value.get("event") or ():  # Timing
            yield from _dates(event)
        bounds = (value.get("repeat") or {}).get("boundsPeriod") if isinstance(
            value.get("repeat"), dict) else None
        if isinstance(bounds, dict):
            yield from _dates(bounds)


def _quantities(value: Any) -> Iterable[tuple[float, str, str]]:
    if isinstance(value, dict) and "value" in value:
        d = decimal_of(value["value"])
        if d is not None:
            system = value.get("system") if isinstance(value.get("system"), str) else ""
            code = value.get("code") if isinstance(value.get("code"), str) else (
                value.get("unit") if isinstance(value.get("unit"), str) else "")
            yield float(d), system or "", code or ""


def _refs(value: Any, ref_type: str | None) -> Iterable[tuple[str, str]]:
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str):
        return
    parsed = parse_reference(ref)
    if parsed is None:
        return
    if ref_type is not None and parsed[0] not in (ref_type, ""):
        return
    if ref_type is not None and parsed[0] == "":
        parsed = (ref_type, parsed[1]) if not parsed[1].startswith("urn:") else parsed
    yield parsed


def add_values(out: Extracted, param: SearchParam, values: list[Any]) -> None:
    code, kind = param.code, param.type
    if kind == "string":
        for v in values:
            for s in _strings(v):
                out.strings.append((code, normalize(s), s))
    elif kind == "token":
        for v in values:
            for system, c, text in _tokens(v):
                if c:
                    out.tokens.append((code, system, c))
                if text:
                    out.texts.append((code, normalize(text)))
    elif kind == "date":
        for v in values:
            out.dates.extend((code, lo, hi) for lo, hi in _dates(v))
    elif kind == "number":
        for v in values:
            d = None if isinstance(v, dict | list) else decimal_of(v)
            if d is not None:
                out.numbers.append((code, float(d)))
    elif kind == "quantity":
        for v in values:
            out.quantities.extend((code, n, s, u) for n, s, u in _quantities(v))
    elif kind == "reference":
        for v in values:
            out.refs.extend((code, t, i) for t, i in _refs(v, param.ref_type))
    elif kind == "uri":
        out.uris.extend((code, v) for v in values if isinstance(v, str))


# ------------------------------------------------------------------ composites

def composite_supported(param: SearchParam) -> bool:
    c = param.components
    return len(c) == 2 and c[0].type == "token" and c[1].type in COMPOSITE_SECOND


def _component_values(comp: Component, items: list[Any]) -> list[Row]:
    """(kind, a, b, lo, hi) rows of one component value list."""
    out: list[Row] = []
    for v in items:
        if comp.type == "token":
            out.extend(("t", s, c, 0.0, 0.0) for s, c, _ in _tokens(v) if c)
        elif comp.type == "quantity":
            out.extend(("q", s, u, n, n) for n, s, u in _quantities(v))
        elif comp.type == "date":
            out.extend(("d", "", "", float(lo), float(hi)) for lo, hi in _dates(v))
        elif comp.type == "string":
            out.extend(("s", "", normalize(s), 0.0, 0.0) for s in _strings(v))
    return out


Row = tuple[str, str, str, float, float]
Memo = dict[tuple[str, str, int, str], list[Row]]


def _composite_items(param: SearchParam, resource: dict[str, Any], fast: bool, memo: Memo
                     ) -> list[tuple[list[Row], list[Row]]]:
    """Per element the composite's base expression selects: both components' values.
    ``memo`` shares values between the composites of one resource (``code`` is the
    first component of many)."""
    out = []
    for branch in _branches(param.path):
        elements = evaluator(branch, param.base, fast)(resource)
        for i, element in enumerate(elements):
            pair = []
            for comp in param.components:
                key = (branch, comp.expression, i, comp.type)
                rows = memo.get(key)
                if rows is None:
                    ev = _relative(comp.expression, branch) if fast else None
                    if ev is not None:
                        values = ev(element)
                    else:  # the reference evaluator needs the element's path for its types
                        values = reference_evaluator(
                            f"{branch}[{i}].{comp.expression}", param.base)(resource)
                    rows = memo[key] = _component_values(comp, values)
                pair.append(rows)
            out.append((pair[0], pair[1]))
    return out


@cache
def _branches(path: str) -> list[str]:
    return fastpath.split_union(path)


@cache
def _relative(expression: str, element_path: str) -> Evaluator | None:
    return fastpath.compile_path(expression, element_path, relative=True)


def add_composite(out: Extracted, param: SearchParam, resource: dict[str, Any],
                  fast: bool, memo: Memo | None = None) -> None:
    for rows1, rows2 in _composite_items(param, resource, fast, {} if memo is None else memo):
        for _, s1, c1, _, _ in rows1:
            for kind, a, b, lo, hi in rows2:
                out.composites.append((param.code, s1, c1, kind, a, b, lo, hi))


# ------------------------------------------------------------------ entry point

@cache
def indexed_params(rtype: str) -> tuple[SearchParam, ...]:
    """The parameters of ``rtype`` whose values are extracted (``_id``/``_lastUpdated``
    come from the record itself; unsupported composites are left out)."""
    return tuple(p for p in registry().params(rtype).values()
                 if p.code not in SPECIAL and p.type in ("string", "token", "date", "number",
                                                         "quantity", "reference", "uri")
                 or (p.type == "composite" and composite_supported(p)))


Plan = tuple[tuple[SearchParam, frozenset[str] | None, Evaluator | None], ...]


@cache
def _plan(rtype: str, fast: bool) -> Plan:
    """Per indexed parameter of ``rtype``: the top-level keys it needs one of (None:
    always evaluated; see ``fastpath.first_keys``) and its evaluator (None: composite)."""
    return tuple((p, fastpath.first_keys(p.path, rtype) if fast else None,
                  None if p.type == "composite" else evaluator(p.path, rtype, fast))
                 for p in indexed_params(rtype))


def extract(resource: dict[str, Any], fast: bool = True) -> Extracted:
    """Every index value of ``resource`` (a FHIR R4 resource as JSON)."""
    rtype = str(resource.get("resourceType", ""))
    out = Extracted()
    memo: Memo = {}
    keys = set(resource)  # a set: isdisjoint then walks the smaller side
    for param, needs, evaluate in _plan(rtype, fast):
        if needs is not None and needs.isdisjoint(keys):
            continue  # a parameter whose elements the resource lacks: nothing to extract
        if evaluate is None:
            add_composite(out, param, resource, fast, memo)
        else:
            add_values(out, param, evaluate(resource))
    return out
