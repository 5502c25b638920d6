"""Planning of FHIR ``transaction`` and ``batch`` Bundles (Synthea loads).

This module owns turning a submitted Bundle into an ordered list of validated
writes (:class:`PlannedEntry`): it checks the Bundle's shape, assigns every
entry its resource id, rewrites every ``urn:uuid:`` (and other ``fullUrl``)
reference to ``<Type>/<id>``, and validates each rewritten resource with
:func:`~medledger.fhir.validate.parse_resource`.

Id rule: an entry whose ``fullUrl`` is ``urn:uuid:<uuid>`` gets ``<uuid>`` as
its id, so loading the same Synthea bundle twice writes the same records
(idempotent).  ``PUT Type/<id>`` keeps ``<id>``; other creates call ``new_id``.
Records are never deleted, so ``DELETE`` entries are refused.

Conditional requests (``PUT Patient?identifier=...`` or ``ifNoneExist``) are
planned with a provisional id and their ``condition``; resolving the condition
against stored records is the node's job (see :func:`rewrite_references` to
re-point references if it picks an existing id).

Pure: no I/O, no clock; ids come from ``new_id``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medledger.errors import InvalidInput
from medledger.fhir.validate import parse_json, parse_resource

__all__ = ["PlannedEntry", "parse_if_match", "plan_transaction", "rewrite_references"]

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
_IF_MATCH_RE = re.compile(r'^(?:W/)?"?([0-9]+)"?$')
_LOCAL_URN_PREFIXES = ("urn:uuid:", "urn:oid:")


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One validated write of a transaction/batch Bundle, in Bundle order."""

    index: int
    method: str  # "POST" (create) or "PUT" (create-or-update)
    resource_type: str
    resource_id: str
    resource: dict[str, Any]  # canonical, references rewritten, ``id`` set
    if_match: int | None  # version precondition from request.ifMatch
    full_url: str | None
    condition: str | None = None  # conditional query (PUT Type?query / POST ifNoneExist)


def parse_if_match(value: object) -> int:
    """The version number in an ``If-Match`` ETag: ``W/"3"``, ``"3"`` or ``3`` -> 3."""
    match = _IF_MATCH_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InvalidInput(f'ifMatch must be a version ETag like W/"3", got {value!r}')
    return int(match.group(1))


def rewrite_references(node: Any, mapping: Mapping[str, str]) -> Any:
    """A copy of ``node`` with every ``reference`` string found in ``mapping`` replaced."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out[key] = mapping.get(value, value)
            else:
                out[key] = rewrite_references(value, mapping)
        return out
    if isinstance(node, list):
        return [rewrite_references(item, mapping) for item in node]
    return node


@dataclass(frozen=True, slots=True)
class _Draft:
    index: int
    method: str
    resource_type: str
    resource_id: str
    resource: Mapping[str, Any]
    if_match: int | None
    full_url: str | None
    condition: str | None


def plan_transaction(
    bundle: Mapping[str, Any] | bytes | str, new_id: Callable[[], str]
) -> list[PlannedEntry]:
    """Validate a transaction/batch Bundle and plan its writes (see the module docstring).

    Raises InvalidInput naming the entry (``Bundle.entry[17] (urn:uuid:..., Observation)``)
    for the first problem found.
    """
    raw = parse_json(bundle) if isinstance(bundle, bytes | str) else bundle
    entries = _bundle_entries(raw)
    drafts: list[_Draft] = []
    mapping: dict[str, str] = {}
    targets: dict[str, int] = {}
    for index, entry in enumerate(entries):
        draft = _draft_entry(index, entry, new_id)
        if draft.full_url is not None:
            if draft.full_url in mapping:
                raise _entry_error(draft, "duplicate fullUrl: another entry already uses it")
            mapping[draft.full_url] = f"{draft.resource_type}/{draft.resource_id}"
        target = f"{draft.resource_type}/{draft.resource_id}"
        if target in targets:
            raise _entry_error(
                draft, f"{target} is already written by Bundle.entry[{targets[target]}]"
            )
        targets[target] = index
        drafts.append(draft)
    return [_finish_entry(draft, mapping) for draft in drafts]


# -- internals ---------------------------------------------------------------------------------


def _bundle_entries(raw: object) -> list[Any]:
    if not isinstance(raw, Mapping):
        raise InvalidInput("expected a Bundle resource (a JSON object)")
    if raw.get("resourceType") != "Bundle":
        raise InvalidInput(f"expected a Bundle, got resourceType {raw.get('resourceType')!r}")
    bundle_type = raw.get("type")
    if bundle_type not in ("transaction", "batch"):
        raise InvalidInput(
            f"Bundle.type must be 'transaction' or 'batch' to be submitted, got {bundle_type!r}"
        )
    entries = raw.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidInput("Bundle.entry must be an array")
    return entries


def _where(index: int, full_url: str | None, resource_type: str | None) -> str:
    details = ", ".join(x for x in (full_url, resource_type) if x)
    return f"Bundle.entry[{index}]" + (f" ({details})" if details else "")


def _entry_error(draft: _Draft, problem: str) -> InvalidInput:
    return InvalidInput(f"{_where(draft.index, draft.full_url, draft.resource_type)}: {problem}")


def _draft_entry(index: int, entry: object, new_id: Callable[[], str]) -> _Draft:
    if not isinstance(entry, Mapping):
        raise InvalidInput(f"Bundle.entry[{index}]: must be a JSON object")
    full_url = entry.get("fullUrl")
    if full_url is not None and (not isinstance(full_url, str) or not full_url):
        raise InvalidInput(f"Bundle.entry[{index}]: fullUrl must be a non-empty string")
    resource = entry.get("resource")
    rtype = resource.get("resourceType") if isinstance(resource, Mapping) else None
    rtype_str = rtype if isinstance(rtype, str) else None

    def fail(problem: str) -> InvalidInput:
        return InvalidInput(f"{_where(index, full_url, rtype_str)}: {problem}")

    request = entry.get("request")
    if not isinstance(request, Mapping):
        raise fail("missing request (a transaction entry needs request.method and request.url)")
    method, url = request.get("method"), request.get("url")
    if method == "DELETE":
        raise fail("DELETE is not supported: medledger records are never deleted (append-only)")
    if method not in ("POST", "PUT"):
        raise fail(f"request.method must be POST or PUT, got {method!r}")
    if not isinstance(url, str) or not url.strip("/"):
        raise fail("missing request.url (e.g. 'Patient' or 'Patient/<id>')")
    if not isinstance(resource, Mapping):
        raise fail(f"{method} needs a resource (a JSON object)")
    if rtype_str is None:
        raise fail("resource has no resourceType")
    url_type, url_id, condition = _split_request_url(url.strip("/"))
    if url_type != rtype_str:
        raise fail(f"request.url {url!r} does not match resourceType {rtype_str!r}")
    if_none_exist = request.get("ifNoneExist")
    if isinstance(if_none_exist, str) and if_none_exist:
        condition = if_none_exist
    if_match = None
    if request.get("ifMatch") is not None:
        try:
            if_match = parse_if_match(request.get("ifMatch"))
        except InvalidInput as exc:
            raise fail(exc.message) from None
    urn_id = _urn_uuid(full_url)
    if method == "PUT" and url_id is not None:
        resource_id = url_id
        body_id = resource.get("id")
        if body_id is not None and body_id != url_id:
            raise fail(f"resource.id {body_id!r} does not match request.url id {url_id!r}")
    elif method == "POST" and url_id is not None:
        raise fail(f"POST goes to the type ({url_type!r}), not to an id; use PUT {url!r}")
    elif urn_id is not None:
        resource_id = urn_id
    elif method == "PUT" and isinstance(resource.get("id"), str):
        resource_id = resource["id"]
    else:
        resource_id = new_id()
    if not _ID_RE.match(resource_id):
        raise fail(f"{resource_id!r} is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")
    return _Draft(
        index, method, rtype_str, resource_id, resource, if_match, full_url, condition or None
    )


def _split_request_url(url: str) -> tuple[str, str | None, str | None]:
    """``Patient`` | ``Patient/<id>`` | ``Patient?query`` -> (type, id, query)."""
    path, _, query = url.partition("?")
    parts = path.split("/")
    if len(parts) >= 2 and _TYPE_RE.match(parts[-2] or ""):
        return parts[-2], parts[-1], query or None
    return parts[-1], None, query or None


def _urn_uuid(full_url: str | None) -> str | None:
    if full_url is None or not full_url.startswith("urn:uuid:"):
        return None
    value = full_url.removeprefix("urn:uuid:")
    return value or None


def _unresolved(node: Any, mapping: Mapping[str, str], path: str) -> tuple[str, str] | None:
    """The first local (urn:) reference not in ``mapping``: (element path, reference)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                if value.startswith(_LOCAL_URN_PREFIXES) and value not in mapping:
                    return f"{path}.reference", value
            else:
                found = _unresolved(value, mapping, f"{path}.{key}")
                if found is not None:
                    return found
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found = _unresolved(item, mapping, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _finish_entry(draft: _Draft, mapping: Mapping[str, str]) -> PlannedEntry:
    missing = _unresolved(draft.resource, mapping, draft.resource_type)
    if missing is not None:
        where, ref = missing
        raise _entry_error(
            draft, f"reference {ref!r} at {where} does not resolve to any entry's fullUrl"
        )
    rewritten = rewrite_references(draft.resource, mapping)
    rewritten["id"] = draft.resource_id
    try:
        resource = parse_resource(rewritten, draft.resource_type)
    except InvalidInput as exc:
        problem = exc.message.removeprefix(f"{draft.resource_type} is invalid: ")
        raise _entry_error(draft, problem) from None
    return PlannedEntry(
        index=draft.index,
        method=draft.method,
        resource_type=draft.resource_type,
        resource_id=draft.resource_id,
        resource=resource,
        if_match=draft.if_match,
        full_url=draft.full_url,
        condition=draft.condition,
    )
