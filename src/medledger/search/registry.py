"""The FHIR R4 SearchParameter registry: which parameters each resource type has.

Data: ``data/search-parameters.r4.json``, trimmed from the spec's registry by
``scripts/vendor_fhir_search.py`` (types Synthea emits, directory types, and the
common ``Resource`` parameters). A parameter keeps the spec's FHIRPath expression;
``where(resolve() is T)`` (which needs a server to resolve references) is turned
into a filter on the reference's type, as HAPI FHIR does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson

TYPES_WITH_SEARCH = ("string", "token", "date", "number", "quantity", "reference", "uri",
                     "composite")
# Common parameters the node answers itself (not from an extracted value).
SPECIAL = frozenset({"_id", "_lastUpdated"})
_RESOLVE = re.compile(r"\.where\(resolve\(\) is (\w+)\)")
_AS_OP = re.compile(r"\(([A-Za-z][\w.]*) as (\w+)\)")
_AS_FN = re.compile(r"\.as\((\w+)\)")


def of_type(expression: str) -> str:
    """``(x as T)`` and ``x.as(T)`` -> ``x.ofType(T)``. R4's expressions apply ``as`` to
    choice elements of repeating parents (``Observation.component.value``), where FHIRPath
    requires a single item; later FHIR versions corrected them to ``ofType``."""
    return _AS_FN.sub(r".ofType(\1)", _AS_OP.sub(r"\1.ofType(\2)", expression))


@dataclass(frozen=True)
class Component:
    """One part of a composite parameter: a parameter code, its type, a relative path."""

    param: str
    type: str
    expression: str


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    base: str  # the resource type this instance is for
    expression: str  # the spec's expression, for this type only
    path: str  # what is evaluated: ``expression`` without ``where(resolve() is T)``
    ref_type: str | None  # references must point to this type (from resolve() is T)
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()


def _load(name: str) -> dict[str, Any]:
    raw = resources.files("medledger.search").joinpath("data", name).read_bytes()
    return orjson.loads(raw)  # type: ignore[no-any-return]


def _param(rtype: str, code: str, doc: dict[str, Any]) -> SearchParam:
    expression = str(doc["expression"])
    if expression.startswith("Resource."):
        expression = rtype + expression[len("Resource"):]
    found = set(_RESOLVE.findall(expression))
    path = of_type(_RESOLVE.sub("", expression) if len(found) == 1 else expression)
    return SearchParam(code=code, type=doc["type"], base=rtype, expression=expression,
                       path=path, ref_type=found.pop() if len(found) == 1 else None,
                       targets=tuple(doc.get("target", ())),
                       components=tuple(Component(c["param"], c["type"], of_type(c["expression"]))
                                        for c in doc.get("component", ())))


class Registry:
    """Search parameters by resource type (the type's own plus the common ones)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.source = doc["source"]
        params = doc["params"]
        common = {**params.get("Resource", {}), **params.get("DomainResource", {})}
        self.types: tuple[str, ...] = tuple(sorted(
            t for t in params if t not in ("Resource", "DomainResource")))
        self._by_type: dict[str, dict[str, SearchParam]] = {}
        for rtype in self.types:
            merged = {**common, **params[rtype]}
            self._by_type[rtype] = {code: _param(rtype, code, d)
                                    for code, d in sorted(merged.items())}
        self._common = {code: _param("Resource", code, d) for code, d in common.items()}

    def params(self, rtype: str) -> dict[str, SearchParam]:
        """Every parameter of ``rtype``; a type outside the registry has the common ones."""
        found = self._by_type.get(rtype)
        if found is None:
            found = {c: _param(rtype, c, {"expression": p.expression.replace(
                "Resource.", f"{rtype}.", 1) if p.expression.startswith("Resource.")
                else p.expression, "type": p.type}) for c, p in self._common.items()}
            self._by_type[rtype] = found
        return found

    def param(self, rtype: str, code: str) -> SearchParam | None:
        return self.params(rtype).get(code)

    def covers(self, rtype: str) -> bool:
        """True when ``rtype`` has its own parameters in the registry (not just common)."""
        return rtype in self.types


@cache
def registry() -> Registry:
    return Registry(_load("search-parameters.r4.json"))


@cache
def compartment_params() -> dict[str, tuple[str, ...]]:
    """Patient CompartmentDefinition: resource type -> the parameters that link it."""
    doc = _load("compartment-patient.r4.json")
    return {t: tuple(p) for t, p in doc["resource"].items()}
