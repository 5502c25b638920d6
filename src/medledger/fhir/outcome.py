"""FHIR response shapes: OperationOutcome and the Bundles the REST API returns.

This module owns the JSON shape of what the FHIR API answers with: error and
information outcomes, ``searchset``, ``history`` and ``transaction-response``
(or ``batch-response``) Bundles.  Builders are pure: ids, times and URLs are
arguments; nothing reads the clock.  Every output validates as FHIR R4B.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

__all__ = [
    "EntryResponse",
    "HistoryEntry",
    "TransactionResult",
    "etag",
    "history_bundle",
    "operation_outcome",
    "searchset_bundle",
    "status_line",
    "transaction_response_bundle",
]

Severity = Literal["fatal", "error", "warning", "information"]

HistoryEntry = tuple[Mapping[str, Any], str, str, str]
"""``(resource, version_id, last_updated_iso, method)``; method is ``POST`` or ``PUT``."""

TransactionResult = tuple[str, str, str, str]
"""``(location, etag, last_modified_iso, status)``, e.g.
``("Patient/p1/_history/2", 'W/"2"', "2024-01-01T00:00:00Z", "201 Created")``."""

_STATUS_BY_METHOD = {"POST": "201 Created", "PUT": "200 OK"}


@dataclass(frozen=True, slots=True)
class EntryResponse:
    """``Bundle.entry.response`` of one transaction/batch entry (+ a read's resource)."""

    status: str  # "201 Created", "404 Not Found" ... (see status_line)
    location: str = ""
    etag: str = ""
    last_modified: str = ""
    outcome: Mapping[str, Any] | None = None  # OperationOutcome of a failed batch entry
    resource: Mapping[str, Any] | None = None  # what a GET entry read


def status_line(code: int) -> str:
    """``404`` -> ``"404 Not Found"`` (the form of Bundle.entry.response.status)."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def etag(version_id: str | int) -> str:
    """The weak ETag of a resource version: ``W/"<version>"``."""
    return f'W/"{version_id}"'


def operation_outcome(
    severity: Severity,
    code: str,
    diagnostics: str,
    expression: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """An OperationOutcome with one issue (``code`` from the FHIR issue-type value set)."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression] if isinstance(expression, str) else list(expression)
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _full_url(base_url: str, resource: Mapping[str, Any]) -> str:
    return f"{base_url.rstrip('/')}/{resource['resourceType']}/{resource['id']}"


def searchset_bundle(
    resources: Iterable[Mapping[str, Any]],
    base_url: str,
    total: int,
    self_link: str,
    *,
    next_link: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """A ``searchset`` Bundle of matches; ``total`` counts all matches, not just this page."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total}
    if timestamp is not None:
        bundle["timestamp"] = timestamp
    links = [{"relation": "self", "url": self_link}]
    if next_link is not None:
        links.append({"relation": "next", "url": next_link})
    bundle["link"] = links
    entries = [
        {"fullUrl": _full_url(base_url, r), "resource": dict(r), "search": {"mode": "match"}}
        for r in resources
    ]
    if entries:
        bundle["entry"] = entries
    return bundle


def history_bundle(
    entries: Iterable[HistoryEntry],
    *,
    base_url: str | None = None,
    self_link: str | None = None,
) -> dict[str, Any]:
    """A ``history`` Bundle, newest first as given; each resource gets its meta version/time."""
    out: list[dict[str, Any]] = []
    for resource, version_id, last_updated, method in entries:
        rtype, rid = resource["resourceType"], resource["id"]
        entry: dict[str, Any] = {}
        if base_url is not None:
            entry["fullUrl"] = _full_url(base_url, resource)
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = version_id
        meta["lastUpdated"] = last_updated
        entry["resource"] = {**resource, "meta": meta}
        entry["request"] = {
            "method": method,
            "url": rtype if method == "POST" else f"{rtype}/{rid}",
        }
        entry["response"] = {
            "status": _STATUS_BY_METHOD.get(method, "200 OK"),
            "etag": etag(version_id),
            "lastModified": last_updated,
        }
        out.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": len(out)}
    if self_link is not None:
        bundle["link"] = [{"relation": "self", "url": self_link}]
    if out:
        bundle["entry"] = out
    return bundle


def transaction_response_bundle(
    entries: Iterable[TransactionResult | EntryResponse], *, batch: bool = False
) -> dict[str, Any]:
    """A ``transaction-response`` (or ``batch-response``) Bundle, one entry per request entry."""
    out = []
    for item in entries:
        if not isinstance(item, EntryResponse):
            location, tag, last_modified, status = item
            item = EntryResponse(status, location, tag, last_modified)
        response: dict[str, Any] = {"status": item.status}
        if item.location:
            response["location"] = item.location
        if item.etag:
            response["etag"] = item.etag
        if item.last_modified:
            response["lastModified"] = item.last_modified
        if item.outcome is not None:
            response["outcome"] = dict(item.outcome)
        entry: dict[str, Any] = {"response": response}
        if item.resource is not None:
            entry["resource"] = dict(item.resource)
        out.append(entry)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "batch-response" if batch else "transaction-response",
    }
    if out:
        bundle["entry"] = out
    return bundle
