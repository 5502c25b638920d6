"""Running a FHIR search for the node: plan on the index, policy and decryption on the page.

The index finds the matching record heads (no decryption, no policy); then, in
result order, each candidate's ledger metadata goes through the node's read policy:
allowed ones fill the page (decrypted), denied ones become withheld notices, and
the scan of one page is bounded, so a caller denied most matches still gets pages
in bounded time (shorter pages, with a ``next`` link). Paging is keyset paging on
the sort key plus the row id, in an opaque HMAC-signed cursor bound to the query.
``total`` counts the matches the caller may see (policy decided once per distinct
patient/category/labels group, not per record).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson

from medledger.core import policy
from medledger.core import state as st
from medledger.crypto.kdf import mac
from medledger.errors import Forbidden, InvalidInput, MedledgerError
from medledger.search.index import COMBO, SearchIndex, combo_key
from medledger.search.query import Compiler, Condition, Query, Sql, parse

DRIVER_LIMIT = 500  # a condition matching at most this many rows drives the query
TOTAL_LIMIT = 1000  # default _total: counted when at most this many rows match
TOTAL_GROUPS = 50  # ... spread over at most this many (patient, category, labels) groups
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
             "code": "SUBSETTED"}


class SearchHost(Protocol):
    """What the engine needs from the node."""

    store: Any

    def decide(self, session: Any, meta: dict[str, Any], break_glass: str | None
               ) -> policy.Decision: ...

    def decrypt(self, meta: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Hit:
    resource: dict[str, Any]
    meta: dict[str, Any]
    mode: str = "match"


@dataclass(frozen=True)
class Withheld:
    ref: str  # "" when the caller may not learn which record (counted, not named)
    category: str
    reason: str
    meta: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # audit


def withheld_notice(meta: dict[str, Any], decision: policy.Decision) -> Withheld:
    """What a searcher learns about a matching record they may not read: the one place
    that decides it (``policy.withheld_view``: named only to those who may see the
    patient; everyone else gets a count and a generic message)."""
    view = policy.withheld_view(meta, decision)
    return Withheld(*view, meta=meta) if view else Withheld("", "", policy.WITHHELD_GENERIC,
                                                            meta=meta)


class SearchResult(NamedTuple):
    found: list[Hit]  # the page (matches), in result order
    withheld: list[Withheld]
    total: int | None  # matches the caller may see; None when not counted
    next_cursor: str | None = None
    prev_cursor: str | None = None
    included: list[Hit] = []
    ignored: list[str] = []
    bases: dict[str, int] = {}  # policy basis -> how many page records it allowed
    break_glass: bool = False


@dataclass
class Scope:
    """Who is searching and which records they may ask about."""

    session: Any
    break_glass: str | None
    patient_only: str | None  # a patient session: only their records (and directory)
    everything_of: str | None = None  # Patient/$everything: the compartment of one patient
    unlimited: bool = False  # return every match ($everything, summaries)


def ref(meta: dict[str, Any]) -> str:
    return f"{meta['type']}/{meta['id']}/_history/{meta['v']}"


# ------------------------------------------------------------------ cursors

class Cursors:
    """Opaque paging cursors: base64url(JSON) + HMAC, bound to the query they page."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def make(self, query_hash: str, direction: str, values: Sequence[Any]) -> str:
        body = orjson.dumps({"q": query_hash, "d": direction, "k": list(values)})
        token = body + mac(self.key, body)[:16]
        return base64.urlsafe_b64encode(token).decode().rstrip("=")

    def open(self, token: str, query_hash: str) -> tuple[str, list[Any]]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, tag = raw[:-16], raw[-16:]
            if mac(self.key, body)[:16] != tag:
                raise ValueError("bad tag")
            doc = orjson.loads(body)
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise InvalidInput("_page is not a cursor this node issued") from exc
        if doc.get("q") != query_hash:
            raise InvalidInput("_page belongs to another search; follow the Bundle's links")
        return str(doc["d"]), list(doc["k"])


def query_hash(rtype: str, items: Sequence[tuple[str, str]]) -> str:
    kept = sorted((n, v) for n, v in items if n != "_page")
    return hashlib.sha256(orjson.dumps([rtype, kept])).hexdigest()[:24]


# ------------------------------------------------------------------ planning

@dataclass
class Plan:
    where: list[Sql] = field(default_factory=list)  # on ``res`` (and ``j``, if ordered)
    order: list[tuple[Sql, bool]] = field(default_factory=list)  # (expr, descending)
    ordered: tuple[str, Sql] | None = None  # join a value index read in row-id order

    @property
    def rid(self) -> str:
        return "j.rid" if self.ordered else "res.rid"


def _base_filters(index: SearchIndex, q: Query, scope: Scope) -> list[Sql] | None:
    filters: list[Sql] = []
    if scope.everything_of is not None:
        filters.append(Sql("res.patient = ?", (scope.everything_of,)))
    else:
        tid = index.tid(q.rtype)
        if tid is None:
            return None  # nothing of this type was ever indexed
        filters.append(Sql("res.tid = ?", (tid,)))
    if scope.patient_only is not None:
        filters.append(Sql("(res.patient = ? OR res.patient IS NULL)", (scope.patient_only,)))
    return filters


def _estimate(index: SearchIndex, cond: Condition, limit: int = DRIVER_LIMIT) -> int:
    """How many rows ``cond`` matches, counted up to ``limit`` + 1."""
    assert cond.driver is not None
    rows = index.query(f"SELECT count(*) FROM ({cond.driver.text} LIMIT {int(limit) + 1})",
                       cond.driver.args)
    return int(rows[0][0])


def plan(index: SearchIndex, q: Query, scope: Scope) -> Plan | None:
    """The WHERE terms and ORDER BY of a query, driven by its most selective condition."""
    base = _base_filters(index, q, scope)
    if base is None:
        return None
    conds = [c for c in q.conditions if c.driver is not None]
    if len(q.conditions) == 1 and conds and conds[0].ordered and not q.sort and \
            scope.everything_of is None and scope.patient_only is None:
        # one equality, newest first: its index in row-id order yields the page's own
        # rows, whatever their number; counting them first would read more
        drivable = [(conds[0], DRIVER_LIMIT + 1)]
    else:
        drivable = _estimates(index, [*_combo(index, q), *conds])
    small = min(drivable, key=lambda x: x[1]) if drivable else None
    driver = small[0] if small is not None and small[1] <= DRIVER_LIMIT else None
    ordered = None
    if driver is not None and driver.ordered and not q.sort:
        ordered, driver = driver, None  # few matches, in row order in their own index
    elif driver is None and not q.sort:  # many matches: read one value index in row order
        by_size = sorted((n, i) for i, (c, n) in enumerate(drivable) if c.ordered)
        ordered = drivable[by_size[0][1]][0] if by_size else None
    out = Plan(base, ordered=None if ordered is None else ordered.ordered)
    if driver is not None and driver.driver is not None and driver.name == COMBO:
        out.where.append(Sql(f"res.rid IN ({driver.driver.text})", driver.driver.args))
    for cond in q.conditions:
        if cond is driver:
            assert cond.driver is not None
            out.where.append(Sql(f"res.rid IN ({cond.driver.text})", cond.driver.args))
        elif cond is not ordered:  # in an ordered walk: on the index row, before ``res``
            out.where.append((cond.lazy_check if ordered else cond.check).bind(out.rid))
    out.order = [(k.expr.bind("res.rid"), k.descending) for k in q.sort]
    return out


def _combo(index: SearchIndex, q: Query) -> list[Condition]:
    """The family + birth date index range, when the query has both parts: a driver
    only (both conditions are still checked), so it may match more, never fewer."""
    parts: dict[str, str] = {}
    for cond in q.conditions:
        if cond.combo is not None:
            parts.setdefault(*cond.combo)
    pid = index.pid(q.rtype, COMBO)
    if pid is None or "family" not in parts or "birthdate" not in parts:
        return []
    low = combo_key(parts["birthdate"], parts["family"])
    return [Condition(COMBO, Sql("1"), Sql("SELECT rid FROM s WHERE pid = ? AND "
                                          "(norm >= ? AND norm < ?)",
                                          (pid, low, low + "\U0010ffff")))]


SMALL_ENOUGH = 200  # a condition this selective drives; ranges then need no estimate
FIRST_ROUND = 64  # estimates first count each condition up to this many rows


def _estimates(index: SearchIndex, conds: list[Condition]) -> list[tuple[Condition, int]]:
    """Bounded match counts: references first (a patient, an encounter: usually the
    fewest rows), then the other equality conditions (those with an ordered index), then
    ranges. Each is counted only up to the smallest count so far (past it, it will not
    drive): after a patient's 9 rows, a common code costs 10 index rows, not
    ``DRIVER_LIMIT``. Once one is small enough to drive, ranges are not counted at all
    (a range may scan many rows to find a few).

    Counting runs in two rounds: up to ``FIRST_ROUND`` rows each, and only when none is
    that small, up to ``DRIVER_LIMIT``. So a common family-name prefix (hundreds of
    rows in a large index) costs 65 index rows when the birth date beside it matches a
    few, not 501: what an estimate reads does not grow with the data."""
    order = sorted(conds, key=_estimate_order)
    first = _count_round(index, order, FIRST_ROUND)
    if not first or min(n for _, n in first) <= FIRST_ROUND:
        return first
    return _count_round(index, order, DRIVER_LIMIT)


def _count_round(index: SearchIndex, conds: list[Condition], limit: int
                 ) -> list[tuple[Condition, int]]:
    out: list[tuple[Condition, int]] = []
    best = limit  # counted up to here: more would not drive
    for cond in conds:
        if cond.ordered is None and best <= SMALL_ENOUGH and best < limit:
            out.append((cond, DRIVER_LIMIT + 1))  # one found drives already
            continue
        n = _estimate(index, cond, best)
        out.append((cond, n if n <= best else DRIVER_LIMIT + 1))
        best = min(best, n)
    return out


def _estimate_order(cond: Condition) -> int:
    if cond.ordered is None:
        return 2
    return 0 if cond.ordered[0] == "r" else 1


def _join(parts: Sequence[Sql], sep: str) -> Sql:
    return Sql(sep.join(p.text for p in parts), tuple(a for p in parts for a in p.args))


def _keyset(order: list[tuple[Sql, bool]], values: list[Any], before: bool,
            rid: str = "res.rid") -> Sql:
    """Rows after (or ``before``) the row whose sort values are ``values`` (+ rid)."""
    terms = [*order, (Sql(rid), True)]
    ors = []
    for i, (expr, desc) in enumerate(terms):
        eqs = [Sql(f"{terms[j][0].text} = ?", (*terms[j][0].args, values[j])) for j in range(i)]
        op = "<" if desc != before else ">"
        ors.append(_join([*eqs, Sql(f"{expr.text} {op} ?", (*expr.args, values[i]))], " AND "))
    return Sql("(" + _join(ors, ") OR (").text + ")", _join(ors, "").args)


def _source(p: Plan) -> str:
    """The FROM of a plan: ``res``, or the ordered value index joined to ``res`` (CROSS
    JOIN: SQLite keeps the index as the outer loop, never scanning ``res`` instead)."""
    return f"{p.ordered[0]} AS j CROSS JOIN res ON res.rid = j.rid" if p.ordered else "res"


def _matching(p: Plan, after: Sql | None = None) -> Sql:
    """The WHERE of a plan (every condition), optionally past a keyset cursor."""
    return _join([*([p.ordered[1]] if p.ordered else []), *p.where,
                  *([after] if after else [])], " AND ")


def candidates(index: SearchIndex, p: Plan, after: Sql | None, limit: int, reverse: bool
               ) -> list[tuple[Any, ...]]:
    """(rid, tid, id, sort values…) of matching rows in result order (for ``reverse``:
    nearest the cursor first)."""
    where = _matching(p, after)
    order = [*p.order, (Sql(p.rid), True)]

    def direction(desc: bool) -> str:
        return "DESC" if desc != reverse else "ASC"

    cols = _join([Sql(f"{p.rid}, res.tid, res.id"), *[e for e, _ in p.order]], ", ")
    source = _source(p)
    sql = (f"SELECT {cols.text} FROM {source} WHERE {where.text} ORDER BY "
           + ", ".join(f"{e.text} {direction(d)}" for e, d in order) + f" LIMIT {int(limit)}")
    args = (*cols.args, *where.args, *(a for e, _ in order for a in e.args))
    return index.query(sql, args)


def _sort_values(row: tuple[Any, ...]) -> list[Any]:
    return [*row[3:], row[0]]


# ------------------------------------------------------------------ running

@dataclass
class Engine:
    index: SearchIndex
    cursors: Cursors
    now_ms: Any  # Callable[[], int]

    def compiler(self) -> Compiler:
        return Compiler(self.index.pid, self.index.tid, int(self.now_ms()))

    def parse(self, rtype: str, items: Sequence[tuple[str, str]], strict: bool) -> Query:
        return parse(rtype, items, self.compiler(), strict)

    def run(self, host: SearchHost, q: Query, items: Sequence[tuple[str, str]],
            scope: Scope, open_records: bool = True) -> SearchResult:
        """The page (and its includes), policy applied. With ``open_records`` False the
        hits carry no resource yet: the caller fetches their content (``ensure_blobs``)
        and then calls ``open``."""
        p = plan(self.index, q, scope)
        bg = False
        if p is None:
            return SearchResult([], [], 0, ignored=q.ignored)
        qh = query_hash(q.rtype, items)
        direction, values = ("n", None) if q.page is None else self.cursors.open(q.page, qh)
        reverse = direction == "p"
        after = None if values is None else _keyset(p.order, values, reverse, p.rid)
        count = 10**9 if scope.unlimited else q.count
        found: list[tuple[Hit, list[Any]]] = []
        withheld: list[Withheld] = []
        bases: dict[str, int] = {}
        edges: tuple[list[Any] | None, list[Any] | None] = (None, None)
        if q.summary != "count" and count > 0:
            found, withheld, more, bg, edges = self._page(host, p, after, count, reverse,
                                                          scope, bases, open_records)
        else:
            more = False
        total = self._total(host, p, q, scope, len(found), more, values is None)
        hits = [h for h, _ in found]
        next_c = prev_c = None
        if edges[0] is not None and not scope.unlimited:
            # cursors sit on the rows examined (not only those returned), so a page of
            # withheld records still leads on; in reverse the scan ran backwards
            first, last = edges if not reverse else (edges[1], edges[0])
            has_next = more if not reverse else True
            has_prev = more if reverse else values is not None
            next_c = self.cursors.make(qh, "n", last) if has_next and last else None
            prev_c = self.cursors.make(qh, "p", first) if has_prev and first else None
        if open_records:
            hits = [self._elements(h, q.elements) for h in hits]
        included = self._includes(host, q, hits, scope, withheld, open_records) if hits and (
            q.include or q.revinclude) else []
        return SearchResult(hits, withheld, total, next_c, prev_c, included, q.ignored,
                            bases, bg)

    def open(self, host: SearchHost, result: SearchResult, elements: tuple[str, ...] | None
             ) -> SearchResult:
        """Decrypt the hits of a result made with ``open_records`` False."""
        found = [self._elements(Hit(host.decrypt(h.meta), h.meta, h.mode), elements)
                 for h in result.found]
        included = []
        for h in result.included:
            try:
                included.append(Hit(host.decrypt(h.meta), h.meta, h.mode))
            except MedledgerError:
                continue  # an included record this node cannot open now is left out
        return result._replace(found=found, included=included)

    def _page(self, host: SearchHost, p: Plan, after: Sql | None, count: int, reverse: bool,
              scope: Scope, bases: dict[str, int], open_records: bool) -> tuple[
                  list[tuple[Hit, list[Any]]], list[Withheld], bool, bool,
                  tuple[list[Any] | None, list[Any] | None]]:
        """Fill one page with allowed matches: (page, withheld, more rows after, break-glass
        used, sort keys of the first and last rows examined)."""
        budget = max(10 * count, 500) if not scope.unlimited else 10**12
        found: list[tuple[Hit, list[Any]]] = []
        withheld: list[Withheld] = []
        bg = False
        first: list[Any] | None = None
        last: list[Any] | None = None

        def done(more: bool) -> tuple[list[tuple[Hit, list[Any]]], list[Withheld], bool, bool,
                                      tuple[list[Any] | None, list[Any] | None]]:
            return (found[::-1] if reverse else found), withheld, more, bg, (first, last)

        while True:
            limit = min(count + 1, 1000) if not scope.unlimited else 5000
            batch = candidates(self.index, p, after, limit, reverse)
            for row in batch:
                if len(found) == count or (last is not None and
                                           len(found) + len(withheld) >= budget):
                    return done(True)
                key = _sort_values(row)
                if key == last:
                    continue  # the same record through two index rows (two codings)
                first = first if first is not None else key
                last = key
                meta = st.record_head(host.store, self.index.type_name(row[1]), row[2])
                if meta is None:
                    continue  # erased or not yet in this node's state
                decision = host.decide(scope.session, meta, scope.break_glass)
                if not decision.allowed:
                    withheld.append(withheld_notice(meta, decision))
                    continue
                bg = bg or decision.break_glass
                bases[decision.basis] = bases.get(decision.basis, 0) + 1
                resource = host.decrypt(meta) if open_records else {}
                found.append((Hit(resource, meta), key))
            if len(batch) < limit:  # the matches ran out
                return done(False)
            after = _keyset(p.order, _sort_values(batch[-1]), reverse, p.rid)

    def _total(self, host: SearchHost, p: Plan, q: Query, scope: Scope, page: int,
               more: bool, first: bool) -> int | None:
        if q.total == "none":
            return None
        if not more and first and q.summary != "count" and q.count > 0 and \
                not scope.unlimited:
            return page  # everything fit on the first page
        groups = self._groups(p, bounded=q.total != "accurate" and q.summary != "count")
        if groups is None:
            return None  # counting would cost a policy decision per patient: not by default
        total = 0
        for (tid, patient, category, labels), n in groups.items():
            meta = {"type": self.index.type_name(tid), "patient": patient,
                    "category": category, "labels": [x for x in labels.split(",") if x]}
            if host.decide(scope.session, meta, scope.break_glass).allowed:
                total += n
        return total

    def _groups(self, p: Plan, bounded: bool) -> dict[tuple[Any, ...], int] | None:
        """Matches per (type, patient, category, labels) group: policy is decided once
        per group. ``bounded`` (the default total) gives up, with None, past
        ``TOTAL_LIMIT`` matches or ``TOTAL_GROUPS`` groups: the rows are read through the
        plan's own index, newest first like the page (whose pages are then still in the
        cache), and the reading stops there, so a type-wide search over many patients
        reads about ``TOTAL_GROUPS`` rows instead of scanning the type for matches."""
        where = _matching(p)
        cols = "res.tid, res.patient, res.category, res.labels"
        if not bounded:  # (a record may reach the ordered index twice: two codings)
            rows = self.index.query(f"SELECT {cols}, count(DISTINCT {p.rid}) FROM "
                                    f"{_source(p)} WHERE {where.text} GROUP BY 1, 2, 3, 4",
                                    where.args)
            return {tuple(r[:4]): int(r[4]) for r in rows}
        order = f" ORDER BY {p.rid} DESC" if p.ordered else ""
        groups: dict[tuple[Any, ...], int] = {}
        counted = 0
        last = None

        def enough(row: tuple[Any, ...]) -> bool:
            nonlocal counted, last
            if row[0] == last:
                return False  # the same record again, next to itself in row-id order
            counted, last = counted + 1, row[0]
            groups[row[1:]] = groups.get(row[1:], 0) + 1
            return counted > TOTAL_LIMIT or len(groups) > TOTAL_GROUPS

        stopped = self.index.scan(f"SELECT {p.rid}, {cols} FROM {_source(p)} WHERE "
                                  f"{where.text}{order} LIMIT {2 * TOTAL_LIMIT + 2}",
                                  where.args, enough)
        return None if stopped else groups

    @staticmethod
    def _elements(hit: Hit, elements: tuple[str, ...] | None) -> Hit:
        if not elements:
            return hit
        keep = {"resourceType", "id", "meta", *elements}
        resource = {k: v for k, v in hit.resource.items() if k in keep}
        meta = dict(resource.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), SUBSETTED]
        resource["meta"] = meta
        return Hit(resource, hit.meta, hit.mode)

    def _includes(self, host: SearchHost, q: Query, hits: list[Hit], scope: Scope,
                  withheld: list[Withheld], open_records: bool) -> list[Hit]:
        seen = {(h.meta["type"], h.meta["id"]) for h in hits}
        targets: list[tuple[str, str]] = []
        for inc in q.include:
            pid = self.index.pid(inc.source, inc.param)
            if pid is None:
                continue
            rids = self._rids([h for h in hits if h.meta["type"] == inc.source])
            for rid_chunk in _chunks(rids, 500):
                marks = ",".join("?" * len(rid_chunk))
                for t, i in self.index.query(
                        f"SELECT type, id FROM r WHERE pid = ? AND rid IN ({marks})",
                        (pid, *rid_chunk)):
                    if t and (inc.target is None or t == inc.target):
                        targets.append((t, i))
        for rev in q.revinclude:
            pid = self.index.pid(rev.source, rev.param)
            tid = self.index.tid(rev.source)
            if pid is None or tid is None:
                continue
            for h in hits:
                for (i,) in self.index.query(
                        "SELECT y.id FROM r JOIN res y ON y.rid = r.rid WHERE r.pid = ? AND "
                        "r.id = ? AND r.type IN (?, '') AND y.tid = ? LIMIT 1000",
                        (pid, h.meta["id"], h.meta["type"], tid)):
                    targets.append((rev.source, i))
        out = []
        for t, i in targets[:1000]:
            if (t, i) in seen:
                continue
            seen.add((t, i))
            meta = st.record_head(host.store, t, i)
            if meta is None:
                continue
            if scope.patient_only and meta.get("patient") not in (None, scope.patient_only):
                continue
            decision = host.decide(scope.session, meta, scope.break_glass)
            if not decision.allowed:
                withheld.append(withheld_notice(meta, decision))
                continue
            if not open_records:
                out.append(Hit({}, meta, "include"))
                continue
            try:
                out.append(Hit(host.decrypt(meta), meta, "include"))
            except MedledgerError:
                continue
        return out

    def _rids(self, hits: list[Hit]) -> list[int]:
        out: list[int] = []
        for h in hits:
            tid = self.index.tid(h.meta["type"])
            rows = self.index.query("SELECT rid FROM res WHERE tid = ? AND id = ?",
                                    (tid, h.meta["id"]))
            out.extend(int(r[0]) for r in rows)
        return out


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_patient_scope(session: Any, q: Query) -> str | None:
    """The patient a patient session is confined to; Forbidden when they name another."""
    if getattr(session, "kind", None) != "patient":
        return None
    others = {p for p in q.patient_refs if p != session.actor_id}
    if others:
        raise Forbidden("patients may search only their own records")
    return str(session.actor_id)
