"""Searchset Bundles and the CapabilityStatement, both from the search package's data.

``searchset`` turns a ``SearchResult`` into a FHIR R4 searchset Bundle: entries with
``search.mode`` match/include, ``total`` when counted, ``link`` self/next/previous
(the cursor in ``_page``), and one OperationOutcome entry (``search.mode`` outcome)
naming the parameters ignored and the records withheld. ``capability`` describes
exactly what this node serves, generated from the same registry the index uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from medledger.core import policy
from medledger.search.engine import SearchResult
from medledger.search.extract import indexed_params
from medledger.search.registry import registry

INTERACTIONS = ("read", "vread", "update", "create", "history-instance", "search-type")
SP_BASE = "http://hl7.org/fhir/SearchParameter/"


def page_url(base: str, rtype: str, items: Sequence[tuple[str, str]], cursor: str) -> str:
    kept = [(n, v) for n, v in items if n != "_page"]
    return f"{base}/{rtype}?" + urlencode([*kept, ("_page", cursor)])


def _outcome(result: SearchResult) -> dict[str, Any] | None:
    issues = [{"severity": "warning", "code": "not-supported",
               "diagnostics": f"search parameter {name!r} is not supported and was ignored"}
              for name in result.ignored]
    issues += [{"severity": "information", "code": "suppressed",
                "diagnostics": f"{w.ref} ({w.category}) withheld: {w.reason}"}
               for w in result.withheld if w.ref]
    unnamed = sum(1 for w in result.withheld if not w.ref)  # counted, never named
    if unnamed:
        issues.append({"severity": "information", "code": "suppressed",
                        "diagnostics": f"{unnamed} records {policy.WITHHELD_GENERIC}"})
    if not issues:
        return None
    return {"resourceType": "OperationOutcome", "issue": issues}


def searchset(result: SearchResult, base: str, rtype: str, items: Sequence[tuple[str, str]],
              self_url: str) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    links = [{"relation": "self", "url": self_url}]
    if result.next_cursor:
        links.append({"relation": "next",
                      "url": page_url(base, rtype, items, result.next_cursor)})
    if result.prev_cursor:
        links.append({"relation": "previous",
                      "url": page_url(base, rtype, items, result.prev_cursor)})
    bundle["link"] = links
    entries = [{"fullUrl": f"{base}/{h.meta['type']}/{h.meta['id']}", "resource": h.resource,
                "search": {"mode": h.mode}} for h in [*result.found, *result.included]]
    outcome = _outcome(result)
    if outcome is not None:
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def _search_params(rtype: str) -> list[dict[str, Any]]:
    out = [{"name": "_id", "type": "token", "definition": SP_BASE + "Resource-id"},
           {"name": "_lastUpdated", "type": "date",
            "definition": SP_BASE + "Resource-lastUpdated"}]
    for p in indexed_params(rtype):
        owner = "Resource" if p.code.startswith("_") else rtype
        out.append({"name": p.code, "type": p.type,
                    "definition": f"{SP_BASE}{owner}-{p.code.lstrip('_')}"})
    return sorted(out, key=lambda x: x["name"])


def capability_resources() -> list[dict[str, Any]]:
    reg = registry()
    out = []
    for rtype in reg.types:
        refs = [p for p in indexed_params(rtype) if p.type == "reference"]
        rev = sorted(f"{t}:{p.code}" for t in reg.types for p in indexed_params(t)
                     if p.type == "reference" and (rtype in p.targets or not p.targets))
        out.append({
            "type": rtype, "versioning": "versioned", "readHistory": True,
            "updateCreate": True, "conditionalDelete": "not-supported",
            "interaction": [{"code": c} for c in INTERACTIONS],
            "searchInclude": sorted(f"{rtype}:{p.code}" for p in refs),
            "searchRevInclude": rev,
            "searchParam": _search_params(rtype)})
    out.append({"type": "Consent", "interaction": [{"code": "create"},
                                                   {"code": "search-type"}],
                "searchParam": [{"name": "patient", "type": "reference"}]})
    out.append({"type": "AuditEvent", "interaction": [{"code": "search-type"}],
                "searchParam": [{"name": "patient", "type": "reference"},
                                {"name": "date", "type": "date"},
                                {"name": "_count", "type": "number"}]})
    return sorted(out, key=lambda r: r["type"])


def capability(base_url: str, org_id: str, date: str, version: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "date": date, "fhirVersion": "4.0.1", "format": ["application/fhir+json"],
        "software": {"name": "medledger", "version": version},
        "implementation": {"description": f"medledger node of {org_id}", "url": base_url},
        "rest": [{
            "mode": "server", "resource": capability_resources(),
            "security": {"service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"}]}]},
            "interaction": [{"code": "transaction"}],
            "searchParam": [{"name": n, "type": t} for n, t in (
                ("_sort", "special"), ("_count", "number"), ("_summary", "token"),
                ("_elements", "special"), ("_include", "special"),
                ("_revinclude", "special"), ("_total", "token"))],
            "operation": [{"name": "match", "definition":
                           "http://hl7.org/fhir/OperationDefinition/Patient-match"},
                          {"name": "everything", "definition":
                           "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                          {"name": "summary", "definition":
                           "http://hl7.org/fhir/uv/ips/OperationDefinition/summary"},
                          # patient rights (api/rights_routes.py, docs/PRIVACY.md)
                          {"name": "erase", "definition":
                           "http://medledger.example/OperationDefinition/Patient-erase"},
                          {"name": "disclosures", "definition":
                           "http://medledger.example/OperationDefinition/"
                           "Patient-disclosures"}]}],
    }
