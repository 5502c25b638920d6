"""Planning of FHIR R4 ``transaction`` and ``batch`` Bundles (http.html#transaction).

This module owns turning a submitted Bundle into a :class:`BundlePlan`: for every
entry, what to do (write a validated resource, reuse an existing one, read) or why
it fails, in the order the specification processes them. It does no I/O: whatever
must be looked up in stored records — the matches of conditional creates
(``ifNoneExist``), conditional updates (``PUT Type?query``) and conditional
references (``Practitioner?identifier=...``) — is asked of a *resolver* the node
provides, which answers a :class:`Query` with the ids of the stored resources that
match it.

Planning runs in two steps so the costly one can run on a worker process:

1. :func:`read_bundle` parses the JSON once (orjson), checks the Bundle's shape and
   each entry's request, assigns ids and validates every resource with
   :func:`~medledger.fhir.validate.parse_resource`. It returns a :class:`BundleDraft`
   whose ``queries`` are the distinct conditional queries the Bundle needs. When it
   parsed the bytes itself it drops each raw entry as soon as the entry is drafted,
   so a large Bundle is held roughly once, not twice.
2. :func:`finish_plan` takes the resolver's answers and resolves conditional
   creates/updates, rewrites ``urn:uuid:`` (any ``fullUrl``) and conditional
   references to ``Type/id`` in place, and orders the entries.

:func:`plan_bundle` does both with a resolver callback.

Rules (FHIR R4 http.html#transaction, with medledger's choices):

* **Ids.** An entry whose ``fullUrl`` is ``urn:uuid:<uuid>`` gets ``<uuid>`` as its id,
  so loading the same Synthea file twice writes the same records (idempotent).
  ``PUT Type/<id>`` keeps ``<id>``; other creates get ``new_id()``.
* **Order.** DELETE, then POST, then PUT/PATCH, then GET/HEAD; conditional references
  are resolved last, so they see the resources this Bundle writes. The plan lists
  entries in that order; ``index`` gives each one's place in ``Bundle.entry`` (the
  response lists entries in request order).
* **Conditional create** (``ifNoneExist``): no match -> create; one match -> no write,
  the entry's ``fullUrl`` points at the match (action ``match``); several -> 412.
* **Conditional update** (``PUT Type?query``): no match -> create (with the body's id if
  it has one); one match -> update it; several -> 412.
* **Conditional reference** (``Type?query``, transactions): exactly one match ->
  ``Type/id``; none -> 404; several -> 412. Matches are the resolver's stored ids plus
  this Bundle's own writes for the ``identifier`` and ``_id`` parameters (what
  conditional references use), which :func:`bundle_match` evaluates.
* **Preconditions**: ``ifMatch`` (``W/"3"``) on PUT, ``ifNoneMatch`` ``*`` on PUT
  (create only) or a version on GET; the node checks them against stored versions.
* **Contained resources** stay inside their container; ``#id`` references must name a
  contained resource (or ``#`` the container) and are left as they are.
* **Transactions** are all or nothing: the first problem raises, naming the entry.
  **Batches** are independent entries: each problem is kept on its entry
  (``problem``, with its HTTP status) and the others go ahead; a batch entry may not
  reference another entry (that is what transactions are for).
* DELETE and PATCH are refused: records are append-only versions (erasure is a
  separate, audited operation).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from medledger.errors import InvalidInput, MedledgerError, NotFound, PreconditionFailed
from medledger.fhir.labels import policy_kind
from medledger.fhir.validate import parse_json, parse_resource

__all__ = [
    "Action",
    "BundleDraft",
    "BundlePlan",
    "EntryPlan",
    "PlannedEntry",
    "Query",
    "Resolver",
    "bundle_match",
    "finish_plan",
    "no_stored_matches",
    "parse_if_match",
    "parse_query",
    "plan_bundle",
    "plan_transaction",
    "read_bundle",
    "rewrite_references",
]

Action = Literal["write", "match", "read", "fail"]
"""``write``: store ``resource`` at ``Type/id`` (create, or a new version if it exists
and differs); ``match``: a conditional create found ``Type/id``, nothing is written;
``read``: a GET/HEAD the node answers after the writes; ``fail``: a batch entry that
cannot be processed (see ``problem``)."""

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
_IF_MATCH_RE = re.compile(r'^(?:W/)?"?([0-9]+)"?$')
_CONDITIONAL_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)\?(.+)$")
_LOCAL_URN_PREFIXES = ("urn:uuid:", "urn:oid:")
# Search result parameters select or shape results; they cannot identify a resource.
_RESULT_PARAMS = frozenset({"_count", "_sort", "_include", "_revinclude", "_summary",
                            "_elements", "_contained", "_containedType", "_total",
                            "_format", "_pretty"})
_METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


# -- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A conditional search, e.g. ``Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1``.

    ``params`` are the decoded ``(name, value)`` pairs, sorted, so the same search
    written in another order is the same query.
    """

    resource_type: str
    params: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return f"{self.resource_type}?" + "&".join(f"{k}={v}" for k, v in self.params)


Resolver = Callable[[Query], Iterable[str]]
"""Ids of the *stored* resources of ``query.resource_type`` that match ``query``."""


def no_stored_matches(query: Query) -> Iterable[str]:
    """A resolver for a node that holds nothing yet (every query matches nothing)."""
    return ()


def parse_query(resource_type: str, text: str) -> Query:
    """``identifier=sys|val&_id=x`` for ``resource_type`` -> :class:`Query`.

    Values are percent-decoded (``+`` stays a plus: FHIR search values are
    RFC 3986 encoded). Result parameters (``_count``, ``_sort``...) are refused.
    """
    if not _TYPE_RE.match(resource_type):
        raise InvalidInput(f"{resource_type!r} is not a FHIR resource type")
    params: list[tuple[str, str]] = []
    for part in text.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = unquote(name)
        if not sep or not name or not value:
            raise InvalidInput(f"search {resource_type}?{text} is malformed: "
                               f"{part!r} is not name=value")
        if name.split(":", 1)[0] in _RESULT_PARAMS:
            raise InvalidInput(f"search {resource_type}?{text} uses {name!r}, which selects "
                               "results and cannot identify a resource")
        params.append((name, unquote(value)))
    if not params:
        raise InvalidInput(f"search {resource_type}?{text} has no parameters")
    return Query(resource_type, tuple(sorted(params)))


def bundle_match(query: Query, resource: Mapping[str, Any]) -> bool | None:
    """Whether ``resource`` matches ``query``, for the parameters a planner can judge
    (``_id`` and ``identifier`` tokens: ``system|value``, ``|value``, ``value``,
    ``system|``; comma = any of). ``None`` when the query uses anything else."""
    if resource.get("resourceType") != query.resource_type:
        return False
    for name, value in query.params:
        if name == "_id":
            matched = resource.get("id") in value.split(",")
        elif name == "identifier":
            matched = any(_identifier_matches(token, resource.get("identifier"))
                          for token in value.split(","))
        else:
            return None
        if not matched:
            return False
    return True


def _identifier_matches(token: str, identifiers: object) -> bool:
    if not isinstance(identifiers, list):
        return False
    system, sep, value = token.partition("|")
    for ident in identifiers:
        if not isinstance(ident, Mapping):
            continue
        if not sep:  # "value": any system
            if ident.get("value") == token:
                return True
        elif not system:  # "|value": no system
            if "system" not in ident and ident.get("value") == value:
                return True
        elif ident.get("system") == system and (not value or ident.get("value") == value):
            return True
    return False


# -- plan types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntryPlan:
    """What to do with one ``Bundle.entry`` (see :data:`Action`)."""

    index: int  # position in Bundle.entry
    method: str  # request.method
    action: Action
    resource_type: str | None
    resource_id: str | None  # the write's or the match's id; a read's id if the url names one
    resource: dict[str, Any] | None = None  # ``write``: validated, references resolved, id set
    full_url: str | None = None
    url: str | None = None  # request.url
    if_match: int | None = None  # version precondition (PUT)
    if_none_match: int | Literal["*"] | None = None  # "*" on PUT: create only; version on GET
    condition: Query | None = None  # ifNoneExist / conditional update query
    problem: MedledgerError | None = None  # ``fail``: why (its http_status is the entry's)
    kind: tuple[str, frozenset[str]] | None = None  # ``write``: (category, labels)

    @property
    def target(self) -> str | None:
        """``Type/id`` of the write or match."""
        if self.resource_type is None or self.resource_id is None:
            return None
        return f"{self.resource_type}/{self.resource_id}"


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """A ``write`` entry, typed for the node that stores it."""

    index: int
    method: str  # POST or PUT
    resource_type: str
    resource_id: str
    resource: dict[str, Any]
    if_match: int | None
    if_none_match: Literal["*"] | None
    full_url: str | None
    condition: Query | None
    kind: tuple[str, frozenset[str]] | None = None  # (category, labels): labels.policy_kind


@dataclass(frozen=True, slots=True)
class BundlePlan:
    """The planned entries of one Bundle, in processing order."""

    kind: Literal["transaction", "batch"]
    entries: tuple[EntryPlan, ...]

    def writes(self) -> Iterator[PlannedEntry]:
        for e in self.entries:
            if e.action != "write":
                continue
            assert e.resource_type and e.resource_id and e.resource is not None
            yield PlannedEntry(e.index, e.method, e.resource_type, e.resource_id, e.resource,
                               e.if_match, "*" if e.if_none_match == "*" else None,
                               e.full_url, e.condition, e.kind)

    def in_request_order(self) -> list[EntryPlan]:
        return sorted(self.entries, key=lambda e: e.index)


@dataclass(slots=True)
class _Draft:
    """One entry after :func:`read_bundle`: request parsed, resource validated."""

    index: int
    method: str
    resource_type: str | None
    resource_id: str | None  # the id it will have if it is created
    full_url: str | None
    url: str | None
    resource: dict[str, Any] | None = None
    references: tuple[str, ...] = ()  # distinct Reference.reference strings, sorted
    # where each ``reference`` string sits: the path (keys, list indices) of its dict, so
    # the loop rewrites them without walking the resource again (``_Resolution.rewrite``)
    ref_sites: tuple[tuple[str | int, ...], ...] = ()
    if_match: int | None = None
    if_none_match: int | Literal["*"] | None = None
    condition: Query | None = None
    conditional_update: bool = False
    body_id: bool = False  # the resource names its own id (conditional update as create)
    problem: MedledgerError | None = None
    kind: tuple[str, frozenset[str]] | None = None  # (category, labels) of the resource
    needs_id: bool = False  # a create with no id of its own: assign_ids draws one


@dataclass(slots=True)
class BundleDraft:
    """A Bundle after :func:`read_bundle`; planned once by :func:`finish_plan`."""

    kind: Literal["transaction", "batch"]
    drafts: list[_Draft]
    queries: frozenset[Query]
    finished: bool = field(default=False)


# -- step 1: read -----------------------------------------------------------------------------


def read_bundle(bundle: Mapping[str, Any] | bytes | str,
                new_id: Callable[[], str]) -> BundleDraft:
    """Parse, check and validate a transaction/batch Bundle (step 1, the costly one).

    A transaction raises on its first bad entry (InvalidInput naming it, e.g.
    ``Bundle.entry[17] (urn:uuid:..., Observation): ...``); a batch keeps the problem
    on the entry. A dict argument is never mutated.
    """
    return assign_ids(read_entries(bundle), new_id)


def read_entries(bundle: Mapping[str, Any] | bytes | str, part: int = 0, parts: int = 1
                 ) -> BundleDraft:
    """:func:`read_bundle` without drawing the new ids (the node reads on worker
    processes and draws ids on its loop, :func:`assign_ids`), for the ``part``-th of
    ``parts`` contiguous slices of ``Bundle.entry`` (the node validates the slices of a
    large Bundle on its workers at once; :func:`join` puts them together). A Bundle
    parsed here releases each raw entry as soon as it is drafted, and the other slices'
    at once."""
    owned = isinstance(bundle, bytes | str)
    raw = parse_json(bundle) if isinstance(bundle, bytes | str) else bundle
    kind, entries = _bundle_entries(raw)
    lo, hi = len(entries) * part // parts, len(entries) * (part + 1) // parts
    if owned:
        entries[:lo] = [None] * lo
        entries[hi:] = [None] * (len(entries) - hi)
    else:
        entries = list(entries)  # a caller's dict is never mutated
    drafts: list[_Draft] = []
    for index in range(lo, hi):
        draft = _read_entry(index, entries[index])
        entries[index] = None
        if draft.problem is not None and kind == "transaction":
            raise draft.problem
        drafts.append(draft)
    queries = {d.condition for d in drafts if d.condition is not None and d.problem is None}
    for draft in drafts:
        if draft.problem is not None:
            continue
        for ref in draft.references:
            query = _conditional_reference(ref)
            if query is not None:
                queries.add(query)
    return BundleDraft(kind, drafts, frozenset(queries))


def join(parts: list[BundleDraft]) -> BundleDraft:
    """The slices of one Bundle (:func:`read_entries`, in order) as one draft."""
    if len(parts) == 1:
        return parts[0]
    return BundleDraft(parts[0].kind, [d for p in parts for d in p.drafts],
                       frozenset().union(*(p.queries for p in parts)))


def assign_ids(draft: BundleDraft, new_id: Callable[[], str]) -> BundleDraft:
    """``draft`` with ``new_id()`` drawn for each entry that needs an id, in entry order
    (a keyed id sequence gives a retried Bundle the same ids)."""
    for d in draft.drafts:
        if d.needs_id:
            d.resource_id = new_id()
            d.needs_id = False
            if d.resource is not None:
                d.resource["id"] = d.resource_id
    return draft


def _bundle_entries(raw: object) -> tuple[Literal["transaction", "batch"], list[Any]]:
    if not isinstance(raw, Mapping):
        raise InvalidInput("expected a Bundle resource (a JSON object)")
    if raw.get("resourceType") != "Bundle":
        raise InvalidInput(f"expected a Bundle, got resourceType {raw.get('resourceType')!r}")
    kind = raw.get("type")
    if kind not in ("transaction", "batch"):
        raise InvalidInput(
            f"Bundle.type must be 'transaction' or 'batch' to be submitted, got {kind!r}"
        )
    entries = raw.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidInput("Bundle.entry must be an array")
    return kind, entries


def _where(index: int, full_url: str | None, resource_type: str | None) -> str:
    details = ", ".join(x for x in (full_url, resource_type) if x)
    return f"Bundle.entry[{index}]" + (f" ({details})" if details else "")


def _entry_error(draft: _Draft, problem: str,
                 kind: type[MedledgerError] = InvalidInput) -> MedledgerError:
    return kind(f"{_where(draft.index, draft.full_url, draft.resource_type)}: {problem}")


def _read_entry(index: int, entry: object) -> _Draft:
    if not isinstance(entry, Mapping):
        return _Draft(index, "?", None, None, None, None,
                      problem=InvalidInput(f"Bundle.entry[{index}]: must be a JSON object"))
    full_url = entry.get("fullUrl")
    resource = entry.get("resource")
    rtype = resource.get("resourceType") if isinstance(resource, Mapping) else None
    draft = _Draft(index, "?", rtype if isinstance(rtype, str) else None, None,
                   full_url if isinstance(full_url, str) else None, None)
    try:
        if full_url is not None and (not isinstance(full_url, str) or not full_url):
            raise InvalidInput("fullUrl must be a non-empty string")
        _read_request(draft, entry.get("request"), resource)
    except InvalidInput as exc:
        problem = exc.message
        if draft.resource_type and problem.startswith(f"{draft.resource_type} is invalid: "):
            problem = problem.removeprefix(f"{draft.resource_type} is invalid: ")
        draft.problem = _entry_error(draft, problem)
        draft.resource = None
    return draft


def _read_request(draft: _Draft, request: object, resource: object) -> None:
    if not isinstance(request, Mapping):
        raise InvalidInput("missing request (a transaction entry needs request.method "
                           "and request.url)")
    method, url = request.get("method"), request.get("url")
    if not isinstance(method, str) or method not in _METHOD_ORDER:
        raise InvalidInput("request.method must be one of GET, HEAD, POST, PUT, PATCH, "
                           f"DELETE, got {method!r}")
    draft.method = method
    if not isinstance(url, str) or not url.strip("/"):
        raise InvalidInput("missing request.url (e.g. 'Patient' or 'Patient/<id>')")
    draft.url = url.strip("/")
    if method == "DELETE":
        raise InvalidInput("DELETE is not supported: medledger records are never deleted "
                           "(append-only versions; erasure is its own audited operation)")
    if method == "PATCH":
        raise InvalidInput("PATCH is not supported: send the whole resource with PUT")
    _read_preconditions(draft, request)
    if method in ("GET", "HEAD"):
        url_type, url_id, _ = _split_request_url(draft.url)
        draft.resource_type = url_type if _TYPE_RE.match(url_type) else None
        draft.resource_id = url_id
        return
    _read_write(draft, request, resource)


def _read_preconditions(draft: _Draft, request: Mapping[str, Any]) -> None:
    if request.get("ifMatch") is not None:
        if draft.method != "PUT":
            raise InvalidInput(f"ifMatch applies to PUT, not {draft.method}")
        draft.if_match = parse_if_match(request["ifMatch"])
    none_match = request.get("ifNoneMatch")
    if none_match is not None:
        if draft.method == "PUT" and isinstance(none_match, str) and none_match.strip() == "*":
            draft.if_none_match = "*"
        elif draft.method in ("GET", "HEAD"):
            draft.if_none_match = parse_if_match(none_match)
        else:
            raise InvalidInput(f"ifNoneMatch must be '*' on PUT or a version ETag on GET, "
                               f"got {none_match!r} on {draft.method}")
    if request.get("ifNoneExist") is not None and draft.method != "POST":
        raise InvalidInput(f"ifNoneExist applies to POST, not {draft.method}")


def _read_write(draft: _Draft, request: Mapping[str, Any], resource: object) -> None:
    assert draft.url is not None
    if not isinstance(resource, Mapping):
        raise InvalidInput(f"{draft.method} needs a resource (a JSON object)")
    rtype = draft.resource_type
    if rtype is None:
        raise InvalidInput("resource has no resourceType")
    url_type, url_id, query = _split_request_url(draft.url)
    if url_type != rtype:
        raise InvalidInput(f"request.url {draft.url!r} does not match resourceType {rtype!r}")
    body_id = resource.get("id")
    urn_id = _urn_uuid(draft.full_url)
    if draft.method == "POST":
        if url_id is not None or query is not None:
            raise InvalidInput(f"POST goes to the type ({url_type!r}), not to {draft.url!r}; "
                               "use PUT for an id or a conditional update")
        if_none_exist = request.get("ifNoneExist")
        if if_none_exist is not None:
            if not isinstance(if_none_exist, str) or not if_none_exist.strip():
                raise InvalidInput("ifNoneExist must be a search query like "
                                   "'identifier=system|value'")
            draft.condition = parse_query(rtype, if_none_exist.rpartition("?")[2])
        draft.resource_id = urn_id
    elif query is not None:  # conditional update
        draft.condition = parse_query(rtype, query)
        draft.conditional_update = True
        draft.body_id = isinstance(body_id, str)
        draft.resource_id = body_id if isinstance(body_id, str) else urn_id
    else:
        if url_id is None:
            raise InvalidInput(f"PUT needs an id or a search in request.url ('{rtype}/<id>' "
                               f"or '{rtype}?identifier=...'), got {draft.url!r}")
        if body_id is not None and body_id != url_id:
            raise InvalidInput(f"resource.id {body_id!r} does not match request.url id "
                               f"{url_id!r}")
        draft.resource_id = url_id
    draft.needs_id = draft.resource_id is None  # assign_ids gives it one
    if draft.resource_id is not None and not _ID_RE.match(draft.resource_id):
        raise InvalidInput(f"{draft.resource_id!r} is not a valid FHIR id "
                           "(1-64 of A-Z a-z 0-9 - .)")
    validated = parse_resource(resource, rtype)
    if draft.resource_id is not None:
        validated["id"] = draft.resource_id
    sites = _reference_sites(validated)
    draft.references = tuple(sorted({ref for _, ref in sites}))
    draft.ref_sites = tuple(path for path, _ in sites)
    _check_local_references(validated, draft.references)
    draft.kind = policy_kind(validated)
    draft.resource = validated


def _split_request_url(url: str) -> tuple[str, str | None, str | None]:
    """``Patient`` | ``Patient/<id>`` | ``Patient?query`` (absolute URLs too) -> parts."""
    path, _, query = url.partition("?")
    parts = path.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":  # Type/id/_history/vid (reads)
        parts = parts[:-2]
    if len(parts) >= 2 and _TYPE_RE.match(parts[-2] or ""):
        return parts[-2], parts[-1], query or None
    return parts[-1], None, query or None


def _urn_uuid(full_url: str | None) -> str | None:
    if full_url is None or not full_url.startswith("urn:uuid:"):
        return None
    return full_url.removeprefix("urn:uuid:") or None


def _reference_sites(resource: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(path of the dict holding it, the string) of every ``reference`` string in
    ``resource`` (contained resources included), in document order."""
    sites: list[tuple[tuple[str | int, ...], str]] = []
    path: list[str | int] = []

    def walk(node: dict[str, Any] | list[Any]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    sites.append((tuple(path), value))
                elif isinstance(value, dict | list):
                    path.append(key)
                    walk(value)
                    path.pop()
        else:
            for i, item in enumerate(node):
                if isinstance(item, dict | list):
                    path.append(i)
                    walk(item)
                    path.pop()

    walk(resource)
    return sites


def _check_local_references(resource: dict[str, Any], refs: Iterable[str]) -> None:
    """``#id`` must name a contained resource; ``#`` alone names the container (ref-1)."""
    contained = {c.get("id") for c in resource.get("contained", ()) if isinstance(c, Mapping)}
    for ref in refs:
        if ref.startswith("#") and ref != "#" and ref[1:] not in contained:
            where = _reference_path(resource, ref)
            raise InvalidInput(f"reference {ref!r} at {where} names no contained resource "
                               f"(contained ids: {sorted(i for i in contained if i) or 'none'})")


def _conditional_reference(ref: str) -> Query | None:
    match = _CONDITIONAL_REF_RE.match(ref)
    if match is None:
        return None
    try:
        return parse_query(match.group(1), match.group(2))
    except InvalidInput:
        return None  # reported with its place when the reference is resolved


# -- step 2: resolve and order ----------------------------------------------------------------


def finish_plan(draft: BundleDraft, answers: Mapping[Query, Iterable[str]]) -> BundlePlan:
    """Resolve ``draft`` with the stored matches of its queries (step 2, cheap).

    ``answers`` maps each query of ``draft.queries`` to the ids of the stored
    resources that match it (missing = none). Rewrites the drafted resources in
    place, so a draft is planned once. Transactions raise on the first problem
    (InvalidInput 400, NotFound 404, PreconditionFailed 412).
    """
    if draft.finished:
        raise ValueError("this BundleDraft was already planned")
    draft.finished = True
    stored = {q: frozenset(ids) for q, ids in answers.items()}
    resolution = _Resolution(draft.kind, stored)
    order = sorted(draft.drafts, key=lambda d: (_METHOD_ORDER.get(d.method, 9), d.index))
    for d in order:
        if d.problem is None and d.method in ("POST", "PUT"):
            resolution.assign(d)
    for d in order:
        if d.problem is None and d.resource is not None and d.method in ("POST", "PUT"):
            resolution.rewrite(d)
    return BundlePlan(draft.kind, tuple(_planned(d, resolution) for d in order))


def plan_bundle(bundle: Mapping[str, Any] | bytes | str, new_id: Callable[[], str],
                resolve: Resolver = no_stored_matches) -> BundlePlan:
    """:func:`read_bundle` then :func:`finish_plan`, asking ``resolve`` each query once."""
    draft = read_bundle(bundle, new_id)
    return finish_plan(draft, {query: tuple(resolve(query)) for query in draft.queries})


def plan_transaction(bundle: Mapping[str, Any] | bytes | str, new_id: Callable[[], str],
                     resolve: Resolver = no_stored_matches) -> list[PlannedEntry]:
    """The writes of a Bundle planned as one transaction (any problem raises)."""
    draft = read_bundle(bundle, new_id)
    draft.kind = "transaction"
    for d in draft.drafts:
        if d.problem is not None:
            raise d.problem
    plan = finish_plan(draft, {query: tuple(resolve(query)) for query in draft.queries})
    return list(plan.writes())


class _Resolution:
    """Ids and references of one Bundle being planned (see :func:`finish_plan`)."""

    def __init__(self, kind: str, stored: Mapping[Query, frozenset[str]]) -> None:
        self.kind = kind
        self.stored = stored
        self.mapping: dict[str, str] = {}  # fullUrl -> Type/id
        self.targets: dict[str, int] = {}  # Type/id written -> entry index
        self.own = _OwnWrites()
        self.resolved: dict[Query, str] = {}  # conditional reference -> Type/id
        self.matched: dict[int, str] = {}  # entry index -> id its conditional create found
        self.full_urls: dict[str, int] = {}  # every entry's fullUrl -> index

    def fail(self, d: _Draft, problem: MedledgerError) -> None:
        if self.kind == "transaction":
            raise problem
        d.problem = problem
        d.resource = None

    def candidates(self, query: Query) -> frozenset[str]:
        """Stored matches, corrected by this transaction's own writes so far."""
        ids = set(self.stored.get(query, ()))
        if self.kind != "transaction":
            return frozenset(ids)  # batch entries see stored records only
        own = self.own.matches(query)
        if own is None:
            return frozenset(ids)  # not judgeable on this Bundle's writes: stored only
        ids -= self.own.ids_of(query.resource_type)  # their new content decides
        return frozenset(ids | own)

    def assign(self, d: _Draft) -> None:
        """Decide the id of a POST/PUT and record its fullUrl and target."""
        if d.full_url is not None:
            if d.full_url in self.full_urls:
                first = self.full_urls[d.full_url]
                self.fail(d, _entry_error(d, f"duplicate fullUrl: Bundle.entry[{first}] "
                                             "already uses it"))
                return
            self.full_urls[d.full_url] = d.index
        if d.condition is not None:
            found = self.candidates(d.condition)
            how = "ifNoneExist" if d.method == "POST" else "conditional update"
            if len(found) > 1:
                self.fail(d, _entry_error(
                    d, f"{how} {d.condition} matches {len(found)} resources "
                       f"({', '.join(sorted(found)[:5])}): it must identify one",
                    PreconditionFailed))
                return
            if found:
                (match_id,) = found
                if d.method == "POST":
                    self.matched[d.index] = match_id
                    d.resource_id = match_id
                    if d.full_url is not None:
                        self.mapping[d.full_url] = f"{d.resource_type}/{match_id}"
                    return
                if d.body_id and d.resource_id != match_id:
                    self.fail(d, _entry_error(
                        d, f"resource.id {d.resource_id!r} differs from {match_id!r}, "
                           f"which {d.condition} matches"))
                    return
                d.resource_id = match_id
        target = f"{d.resource_type}/{d.resource_id}"
        if target in self.targets:
            self.fail(d, _entry_error(d, f"{target} is already written by "
                                         f"Bundle.entry[{self.targets[target]}]"))
            return
        self.targets[target] = d.index
        if d.resource is not None:
            d.resource["id"] = d.resource_id
            self.own.add(d.resource)
        if d.full_url is not None:
            self.mapping[d.full_url] = target

    def rewrite(self, d: _Draft) -> None:
        """Point the entry's urn:uuid and conditional references at ``Type/id``."""
        assert d.resource is not None
        replace: dict[str, str] = {}
        for ref in d.references:
            try:
                new = self._resolve_reference(d, ref)
            except MedledgerError as exc:
                where = _reference_path(d.resource, ref)
                cls = type(exc)
                self.fail(d, _entry_error(d, f"reference {ref!r} at {where} {exc.message}",
                                          cls))
                return
            if new is not None and new != ref:
                replace[ref] = new
        if replace:
            for path in d.ref_sites:
                node: Any = d.resource
                for step in path:
                    node = node[step]
                new = replace.get(node["reference"])
                if new is not None:
                    node["reference"] = new

    def _resolve_reference(self, d: _Draft, ref: str) -> str | None:
        mapped = self.mapping.get(ref)
        if mapped is not None:
            if self.kind == "batch":
                raise InvalidInput("names another entry of this batch; batch entries are "
                                   "independent (use a transaction Bundle to link entries)")
            return mapped
        if ref in self.full_urls:  # an entry that failed (batch) or was refused
            raise InvalidInput("names an entry that is not written")
        if ref.startswith(_LOCAL_URN_PREFIXES):
            raise InvalidInput("does not resolve to any entry's fullUrl")
        match = _CONDITIONAL_REF_RE.match(ref)
        if match is None:
            return None
        query = parse_query(match.group(1), match.group(2))
        known = self.resolved.get(query)
        if known is not None:
            return known
        found = self.candidates(query)
        if not found:
            raise NotFound(f"matches no {query.resource_type} (conditional reference)")
        if len(found) > 1:
            raise PreconditionFailed(f"matches {len(found)} {query.resource_type} resources "
                                     f"({', '.join(sorted(found)[:5])}): it must identify one")
        (rid,) = found
        self.resolved[query] = f"{query.resource_type}/{rid}"
        return self.resolved[query]


class _OwnWrites:
    """An index of the resources a transaction writes, for ``_id``/``identifier`` matching
    (what :func:`bundle_match` judges), so each lookup costs O(1), not O(entries)."""

    def __init__(self) -> None:
        self.by_type: dict[str, set[str]] = {}
        self.tokens: dict[tuple[str, str], set[str]] = {}  # (type, token) -> ids

    def add(self, resource: Mapping[str, Any]) -> None:
        rtype, rid = resource["resourceType"], resource["id"]
        self.by_type.setdefault(rtype, set()).add(rid)
        for token in _identifier_tokens(resource.get("identifier")):
            self.tokens.setdefault((rtype, token), set()).add(rid)

    def ids_of(self, resource_type: str) -> set[str]:
        return self.by_type.get(resource_type, set())

    def matches(self, query: Query) -> set[str] | None:
        result: set[str] | None = None
        for name, value in query.params:
            if name == "_id":
                found = {v for v in value.split(",") if v in self.ids_of(query.resource_type)}
            elif name == "identifier":
                found = set()
                for token in value.split(","):
                    found |= self.tokens.get((query.resource_type, _token_key(token)), set())
            else:
                return None
            result = found if result is None else result & found
        return result if result is not None else set()


def _token_key(token: str) -> str:
    """Index key of an identifier search token: ``s|v``, ``|v`` (no system), ``v`` (any
    system) or ``s|`` (any value)."""
    return token if "|" in token else f"*|{token}"


def _identifier_tokens(identifiers: object) -> Iterator[str]:
    """The search tokens an identifier list answers to (see :func:`_token_key`)."""
    if not isinstance(identifiers, list):
        return
    for ident in identifiers:
        if not isinstance(ident, Mapping):
            continue
        system, value = ident.get("system"), ident.get("value")
        if isinstance(value, str):
            yield f"*|{value}"
            yield f"{system}|{value}" if isinstance(system, str) else f"|{value}"
        if isinstance(system, str):
            yield f"{system}|"


def _planned(d: _Draft, resolution: _Resolution) -> EntryPlan:
    action: Action
    resource_id, resource = d.resource_id, None
    if d.problem is not None:
        action = "fail"
    elif d.method in ("GET", "HEAD"):
        action = "read"
    elif d.index in resolution.matched:
        action, resource_id = "match", resolution.matched[d.index]
    else:
        action, resource = "write", d.resource
    return EntryPlan(index=d.index, method=d.method, action=action,
                        resource_type=d.resource_type, resource_id=resource_id,
                        resource=resource, full_url=d.full_url, url=d.url,
                        if_match=d.if_match, if_none_match=d.if_none_match,
                        condition=d.condition, problem=d.problem,
                        kind=d.kind if action == "write" else None)


# -- references -------------------------------------------------------------------------------


def parse_if_match(value: object) -> int:
    """The version number in an ETag: ``W/"3"``, ``"3"`` or ``3`` -> 3."""
    match = _IF_MATCH_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InvalidInput(f'expected a version ETag like W/"3", got {value!r}')
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


def _reference_path(resource: dict[str, Any], ref: str) -> str:
    """The element path of the first ``reference`` equal to ``ref`` (for messages), as
    ``Observation.encounter.reference``."""
    for path, value in _reference_sites(resource):
        if value == ref:
            steps = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
            return f"{resource.get('resourceType', '')}{steps}.reference"
    return "?"

