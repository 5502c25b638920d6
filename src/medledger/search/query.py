"""FHIR search requests: parsing into a ``Query``, and each condition as SQL on the index.

Parsing follows FHIR R4 search (search.html): repeated parameters are AND, commas
within one value OR (``\\,`` escapes a comma); ``name:modifier``; value prefixes
``eq ne gt lt ge le sa eb ap`` for ordered types; ``[system]|[code]`` tokens;
``[prefix]number|system|code`` quantities; references ``Type/id`` or ``id`` and
chains ``subject:Patient.family=x``; composites ``a$b``. Result parameters:
``_sort _count _summary _elements _include _revinclude _total`` and ``_page`` (our
opaque paging cursor). Unknown parameters are reported (or refused with
``Prefer: handling=strict``); an unsupported modifier or a malformed value is a 400.

Every condition compiles to two SQL fragments: ``driver`` (the row ids it matches,
read through a value index) and ``check`` (a correlated test of one row id).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medledger.errors import InvalidInput
from medledger.search.registry import SearchParam, registry
from medledger.search.values import (
    MAX_MS,
    MIN_MS,
    date_range,
    decimal_of,
    implicit_range,
    normalize,
)

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = frozenset({"_sort", "_count", "_summary", "_elements", "_include",
                           "_revinclude", "_total", "_page", "_format", "_pretty"})
MODIFIERS: dict[str, frozenset[str]] = {
    "string": frozenset({"", "exact", "contains", "missing"}),
    "token": frozenset({"", "not", "text", "missing"}),
    "date": frozenset({"", "missing"}),
    "number": frozenset({"", "missing"}),
    "quantity": frozenset({"", "missing"}),
    "reference": frozenset({"", "missing"}),
    "uri": frozenset({"", "below", "missing"}),
    "composite": frozenset({"", "missing"}),
}
TABLE = {"string": "s", "token": "t", "date": "d", "number": "n", "quantity": "q",
         "reference": "r", "uri": "u", "composite": "c"}
MAX_COUNT = 1000
DEFAULT_COUNT = 50


@dataclass(frozen=True)
class Sql:
    """A SQL fragment with its arguments; ``{rid}`` stands for the row id being tested."""

    text: str
    args: tuple[Any, ...] = ()

    def bind(self, rid: str) -> Sql:
        return Sql(self.text.replace("{rid}", rid), self.args)


@dataclass(frozen=True)
class Condition:
    """One search parameter occurrence: any of its values may match (OR)."""

    name: str  # as the client wrote it, e.g. ``code:not`` or ``subject:Patient.family``
    check: Sql  # true when row ``{rid}`` matches
    driver: Sql | None  # the row ids that match, through an index (None: not drivable)
    # (table, WHERE on alias ``j``): an index that yields the matching row ids in row-id
    # order (one token or reference value), so a page reads only its own rows
    ordered: tuple[str, Sql] | None = None
    # ``check`` as a subquery SQLite runs as written (``LIMIT 1`` keeps it from becoming
    # a join): tests the rows of an ordered walk before their ``res`` row is read
    probe: Sql | None = None
    # (parameter, key) of a plain one-value ``family`` (normalised) or day-precision
    # ``birthdate`` on Patient: parts of the family + birth date index (index.COMBO)
    combo: tuple[str, str] | None = None

    @property
    def lazy_check(self) -> Sql:
        return self.probe or self.check


@dataclass(frozen=True)
class SortKey:
    param: str
    descending: bool
    expr: Sql  # the sort value of row ``{rid}`` (never NULL)


@dataclass(frozen=True)
class Include:
    source: str  # resource type holding the reference
    param: str
    target: str | None


@dataclass
class Query:
    rtype: str
    conditions: list[Condition] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    include: list[Include] = field(default_factory=list)
    revinclude: list[Include] = field(default_factory=list)
    total: str | None = None
    page: str | None = None
    ignored: list[str] = field(default_factory=list)
    patient_refs: set[str] = field(default_factory=set)  # ids named by patient/subject


PidOf = Callable[[str, str], int | None]
TidOf = Callable[[str], int | None]


def split_values(raw: str) -> list[str]:
    """Comma-separated alternatives; ``\\,`` is a literal comma."""
    out, cur, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ",$|\\":
            cur.append(raw[i + 1])
            i += 2
            continue
        if ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and not value[:2].isdigit() and (
            value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


_COLUMN = re.compile(r"\b(code|sys|id|type)\b")
# a single equality on the value column: (pid, value, rid…) is then in row-id order
_ORDERED = re.compile(r"^\(?(code|id) = \?")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ------------------------------------------------------------------ per type

def _string(mod: str, values: list[str]) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        norm = normalize(v)
        if mod == "exact":
            parts.append("(norm = ? AND exact = ?)")
            args += [norm, v]
        elif mod == "contains":
            parts.append("norm LIKE ? ESCAPE '\\'")
            args.append(f"%{_like_escape(norm)}%")
        else:  # starts with, through the index: [norm, norm + U+10FFFF)
            parts.append("(norm >= ? AND norm < ?)")
            args += [norm, norm + "\U0010ffff"]
    return " OR ".join(parts), args


def _token(values: list[str]) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        if "|" in v:
            system, code = v.split("|", 1)
            if system and code:
                parts.append("(code = ? AND sys = ?)")
                args += [code, system]
            elif code:  # |code: no system
                parts.append("(code = ? AND sys = '')")
                args.append(code)
            elif system:
                parts.append("sys = ?")
                args.append(system)
            else:
                raise InvalidInput("a token search value needs a system or a code")
        else:
            if not v:
                raise InvalidInput("a token search value may not be empty")
            parts.append("code = ?")
            args.append(v)
    return " OR ".join(parts), args


def _date_clause(prefix: str, value: str, now_ms: int, lo_col: str = "lo",
                 hi_col: str = "hi") -> tuple[str, list[Any]]:
    rng = date_range(value)
    if rng is None:
        raise InvalidInput(f"bad date search value {value!r}; use e.g. ge2024-01-01 or "
                           "2024-01-01T10:00:00Z")
    slo, shi = rng
    lo, hi = lo_col, hi_col
    # Every stored range has lo <= hi (extract.py orders a reversed Period), so the
    # bounds on ``lo`` below are implied; they let a prefix use the index on (lo, hi)
    # or (hi, lo) as a range instead of scanning to the end of the parameter's rows.
    if prefix == "eq":
        return f"({lo} >= ? AND {lo} <= ? AND {hi} <= ?)", [slo, shi, shi]
    if prefix == "ne":
        return f"NOT ({lo} >= ? AND {hi} <= ?)", [slo, shi]
    if prefix == "gt":
        return f"{hi} > ?", [shi]
    if prefix == "lt":
        return f"{lo} < ?", [slo]
    if prefix == "ge":
        return f"({hi} >= ? AND ({hi} > ? OR {lo} >= ?))", [slo, shi, slo]
    if prefix == "le":
        return f"({lo} <= ? AND ({lo} < ? OR {hi} <= ?))", [shi, slo, shi]
    if prefix == "sa":
        return f"{lo} >= ?", [shi]
    if prefix == "eb":
        return f"{hi} <= ?", [slo]
    # ap: overlaps the value widened by 10% of its distance from now (at least a day)
    slack = max(abs(now_ms - slo) // 10, 86_400_000)
    return f"({lo} < ? AND {hi} > ?)", [shi + slack, slo - slack]


def _date(values: list[str], now_ms: int) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        prefix, rest = _prefix(v)
        clause, a = _date_clause(prefix, rest, now_ms)
        parts.append(clause)
        args += a
    return " OR ".join(parts), args


def _number_clause(prefix: str, text: str, col: str = "val") -> tuple[str, list[Any]]:
    rng = implicit_range(text)
    d = decimal_of(text)
    if rng is None or d is None:
        raise InvalidInput(f"bad number in search value {text!r}")
    lo, hi = rng
    x = float(d)
    if prefix == "eq":
        return f"({col} >= ? AND {col} < ?)", [lo, hi]
    if prefix == "ne":
        return f"NOT ({col} >= ? AND {col} < ?)", [lo, hi]
    if prefix in ("gt", "sa"):
        return f"{col} > ?", [x]
    if prefix in ("lt", "eb"):
        return f"{col} < ?", [x]
    if prefix == "ge":
        return f"{col} >= ?", [x]
    if prefix == "le":
        return f"{col} <= ?", [x]
    slack = abs(x) / 10  # ap: within 10%
    return f"({col} >= ? AND {col} <= ?)", [x - slack, x + slack]


def _number(values: list[str]) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        prefix, rest = _prefix(v)
        clause, a = _number_clause(prefix, rest)
        parts.append(clause)
        args += a
    return " OR ".join(parts), args


def _quantity_clause(v: str, val: str = "val", sys: str = "sys", code: str = "code"
                     ) -> tuple[str, list[Any]]:
    prefix, rest = _prefix(v)
    number, _, units = rest.partition("|")
    clause, args = _number_clause(prefix, number, val)
    if units:
        system, _, unit = units.partition("|")
        if system:
            clause += f" AND {sys} = ?"
            args.append(system)
        if unit:
            clause += f" AND {code} = ?"
            args.append(unit)
    return f"({clause})", args


def _quantity(values: list[str]) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        clause, a = _quantity_clause(v)
        parts.append(clause)
        args += a
    return " OR ".join(parts), args


def _reference(param: SearchParam, type_mod: str, values: list[str]) -> tuple[str, list[Any]]:
    parts, args = [], []
    for v in values:
        v = v.strip()
        if not v:
            raise InvalidInput(f"{param.code}: a reference search value may not be empty")
        tail = v.split("?")[0].rstrip("/").split("/")
        if len(tail) >= 4 and tail[-2] == "_history":
            tail = tail[:-2]
        if len(tail) >= 2:
            rtype, rid = tail[-2], tail[-1]
            if type_mod and rtype != type_mod:
                raise InvalidInput(f"{param.code}:{type_mod} does not match {v!r}")
            parts.append("(id = ? AND type IN (?, ''))")
            args += [rid, rtype]
        elif type_mod:
            parts.append("(id = ? AND type IN (?, ''))")
            args += [tail[-1], type_mod]
        else:
            parts.append("id = ?")
            args.append(tail[-1])
    return " OR ".join(parts), args


def _uri(mod: str, values: list[str]) -> tuple[str, list[Any]]:
    if mod == "below":
        return " OR ".join("val LIKE ? ESCAPE '\\'" for _ in values), [
            _like_escape(v) + "%" for v in values]
    return " OR ".join("val = ?" for _ in values), list(values)


def _composite(param: SearchParam, values: list[str], now_ms: int) -> tuple[str, list[Any]]:
    second = param.components[1].type
    parts, args = [], []
    for v in values:
        left, sep, right = v.partition("$")
        if not sep:
            raise InvalidInput(f"{param.code}: a composite value looks like a$b")
        system, bar, code = left.partition("|")
        clause, a = (["code1 = ?"], [code]) if bar else (["code1 = ?"], [left])
        if bar and system:
            clause.append("sys1 = ?")
            a.append(system)
        if second == "token":
            s2, bar2, c2 = right.partition("|")
            clause.append("kind = 't' AND b = ?")
            a.append(c2 if bar2 else right)
            if bar2 and s2:
                clause.append("a = ?")
                a.append(s2)
        elif second == "quantity":
            q, qa = _quantity_clause(right, "lo", "a", "b")
            clause.append(f"kind = 'q' AND {q}")
            a += qa
        elif second == "date":
            prefix, rest = _prefix(right)
            dq, da = _date_clause(prefix, rest, now_ms)
            clause.append(f"kind = 'd' AND {dq}")
            a += da
        else:
            clause.append("kind = 's' AND b >= ? AND b < ?")
            a += [normalize(right), normalize(right) + "\U0010ffff"]
        parts.append("(" + " AND ".join(clause) + ")")
        args += a
    return " OR ".join(parts), args


# ------------------------------------------------------------------ conditions

def _combo_part(rtype: str, code: str, mod: str, values: list[str]
                ) -> tuple[str, str] | None:
    if rtype != "Patient" or mod or len(values) != 1:
        return None
    if code == "family":
        return code, normalize(values[0])
    if code == "birthdate":
        prefix, value = _prefix(values[0])
        rng = date_range(value) if prefix == "eq" else None
        if rng is not None and rng[1] - rng[0] == 86_400_000:  # a whole day
            return code, str(rng[0])
    return None


@dataclass
class Compiler:
    """Turns (parameter, modifier, values) into a ``Condition`` for one resource type."""

    pid_of: PidOf
    tid_of: TidOf
    now_ms: int

    def condition(self, rtype: str, name: str, raw: str) -> Condition | None:
        """None when ``name`` is not a parameter of ``rtype`` (unknown)."""
        code, _, mod = name.partition(":")
        chain = ""
        if "." in code:  # subject.name=… (no type)
            code, chain = code.split(".", 1)
        elif "." in mod:  # subject:Patient.name=…
            mod, chain = mod.split(".", 1)
        if code == "_id":
            return self._id(name, raw, mod)
        if code == "_lastUpdated":
            return self._last_updated(name, raw, mod)
        param = registry().param(rtype, code)
        if param is None:
            return None
        values = split_values(raw)
        if chain:
            return self._chain(rtype, name, param, mod, chain, raw)
        if mod == "missing":
            return self._missing(name, param, raw, rtype)
        allowed = MODIFIERS.get(param.type, frozenset({""}))
        if param.type == "reference":
            if mod and mod not in allowed and not (mod in param.targets or
                                                   mod[:1].isupper()):
                raise InvalidInput(f"modifier :{mod} is not supported on {code} (reference)")
        elif mod not in allowed:
            raise InvalidInput(f"modifier :{mod} is not supported on {code} ({param.type}); "
                               f"supported: {', '.join(sorted(m for m in allowed if m))}")
        pid = self.pid_of(rtype, code)
        table = TABLE[param.type]
        if param.type == "token" and mod == "text":
            table = "tt"
            where, args = self._text(values)
        else:
            where, args = self._where(param, mod, values)
        if pid is None:  # nothing indexed for this parameter yet: matches nothing
            return Condition(name, Sql("0"), Sql("SELECT NULL AS rid WHERE 0"))
        rows = f"SELECT 1 FROM {table} WHERE rid = {{rid}} AND pid = ? AND ({where})"
        check = Sql(f"EXISTS ({rows})", (pid, *args))
        probe = Sql(f"EXISTS ({rows} LIMIT 1)", (pid, *args))
        if param.type == "token" and mod == "not":
            return Condition(name, Sql(f"NOT {check.text}", check.args), None,
                             probe=Sql(f"NOT {probe.text}", probe.args))
        driver = Sql(f"SELECT rid FROM {table} WHERE pid = ? AND ({where})", (pid, *args))
        ordered = None
        if param.type in ("token", "reference") and mod != "text" and len(values) == 1 and \
                _ORDERED.match(where):
            qualified = _COLUMN.sub(r"j.\1", where)
            ordered = (table, Sql(f"j.pid = ? AND ({qualified})", (pid, *args)))
        return Condition(name, check, driver, ordered, probe,
                         _combo_part(rtype, code, mod, values))

    def _where(self, param: SearchParam, mod: str, values: list[str]) -> tuple[str, list[Any]]:
        t = param.type
        if t == "string":
            return _string(mod, values)
        if t == "token":
            return _token(values)
        if t == "date":
            return _date(values, self.now_ms)
        if t == "number":
            return _number(values)
        if t == "quantity":
            return _quantity(values)
        if t == "reference":
            return _reference(param, mod, values)
        if t == "uri":
            return _uri(mod, values)
        if t == "composite":
            return _composite(param, values, self.now_ms)
        raise InvalidInput(f"search parameters of type {t} are not supported")

    @staticmethod
    def _text(values: list[str]) -> tuple[str, list[Any]]:
        parts, args = [], []
        for v in values:
            norm = _like_escape(normalize(v))
            parts.append("(norm LIKE ? ESCAPE '\\' OR norm LIKE ? ESCAPE '\\')")
            args += [f"{norm}%", f"% {norm}%"]
        return " OR ".join(parts), args

    def _missing(self, name: str, param: SearchParam, raw: str, rtype: str) -> Condition:
        if raw not in ("true", "false"):
            raise InvalidInput(f"{name} takes true or false")
        table = TABLE.get(param.type)
        pid = self.pid_of(rtype, param.code)
        if table is None or pid is None:
            return Condition(name, Sql("1" if raw == "true" else "0"), None)
        exists = Sql(f"EXISTS (SELECT 1 FROM {table} WHERE rid = {{rid}} AND pid = ?)", (pid,))
        if raw == "true":
            return Condition(name, Sql(f"NOT {exists.text}", exists.args), None)
        return Condition(name, exists, Sql(f"SELECT DISTINCT rid FROM {table} WHERE pid = ?",
                                           (pid,)))

    def _id(self, name: str, raw: str, mod: str) -> Condition:
        if mod:
            raise InvalidInput(f"modifier :{mod} is not supported on _id")
        ids = [v for v in split_values(raw) if v]
        if not ids:
            raise InvalidInput("_id needs at least one id")
        marks = ", ".join("?" for _ in ids)
        return Condition(name, Sql(f"EXISTS (SELECT 1 FROM res x WHERE x.rid = {{rid}} AND "
                                   f"x.id IN ({marks}))", tuple(ids)),
                         Sql(f"SELECT rid FROM res WHERE id IN ({marks})", tuple(ids)))

    def _last_updated(self, name: str, raw: str, mod: str) -> Condition:
        if mod:
            raise InvalidInput(f"modifier :{mod} is not supported on _lastUpdated")
        parts, args = [], []
        for v in split_values(raw):
            prefix, rest = _prefix(v)
            clause, a = _date_clause(prefix, rest, self.now_ms, "x.updated", "(x.updated + 1)")
            parts.append(clause)
            args += a
        where = " OR ".join(parts)
        return Condition(name, Sql(f"EXISTS (SELECT 1 FROM res x WHERE x.rid = {{rid}} AND "
                                   f"({where}))", tuple(args)), None)

    def _chain(self, rtype: str, name: str, param: SearchParam, type_mod: str, chain: str,
               raw: str) -> Condition:
        if param.type != "reference":
            raise InvalidInput(f"{param.code} is not a reference: it cannot be chained")
        targets = [type_mod] if type_mod else [
            t for t in param.targets if registry().param(t, chain.split(":")[0].split(".")[0])]
        if len(targets) != 1:
            raise InvalidInput(f"chained search {name}: say which resource type, e.g. "
                               f"{param.code}:{(param.targets or ('Patient',))[0]}.{chain}")
        target = targets[0]
        inner = self.condition(target, chain, raw)
        if inner is None:
            raise InvalidInput(f"chained search {name}: {target} has no search parameter "
                               f"{chain!r}")
        pid, tid = self.pid_of(rtype, param.code), self.tid_of(target)
        if pid is None or tid is None:
            return Condition(name, Sql("0"), Sql("SELECT NULL AS rid WHERE 0"))
        inner_check = inner.check.bind("y.rid")
        check = Sql("EXISTS (SELECT 1 FROM r JOIN res y ON y.tid = ? AND y.id = r.id "
                    "WHERE r.rid = {rid} AND r.pid = ? AND r.type IN (?, '') AND "
                    f"{inner_check.text})", (tid, pid, target, *inner_check.args))
        driver = Sql("SELECT r.rid FROM r JOIN res y ON y.tid = ? AND y.id = r.id "
                     "WHERE r.pid = ? AND r.type IN (?, '') AND " + inner_check.text,
                     (tid, pid, target, *inner_check.args))
        return Condition(name, check, driver)


# ------------------------------------------------------------------ sort

def sort_key(rtype: str, spec: str, pid_of: PidOf) -> SortKey:
    desc = spec.startswith("-")
    code = spec.lstrip("-")
    if code == "_id":
        return SortKey(code, desc, Sql("(SELECT x.id FROM res x WHERE x.rid = {rid})"))
    if code == "_lastUpdated":
        return SortKey(code, desc, Sql("(SELECT x.updated FROM res x WHERE x.rid = {rid})"))
    param = registry().param(rtype, code)
    if param is None or param.type in ("composite",):
        raise InvalidInput(f"cannot sort {rtype} by {code!r}: not a sortable search "
                           "parameter of this type")
    pid = pid_of(rtype, code) or -1
    table = TABLE[param.type]
    column, low, high = {
        "string": ("norm", "''", "char(1114111)"), "token": ("code", "''", "char(1114111)"),
        "date": ("lo" if not desc else "hi", str(MIN_MS), str(MAX_MS)),
        "number": ("val", "-1e308", "1e308"), "quantity": ("val", "-1e308", "1e308"),
        "reference": ("id", "''", "char(1114111)"), "uri": ("val", "''", "char(1114111)"),
    }[param.type]
    # ascending: the smallest value, missing last; descending: the largest, missing last
    agg, missing = ("max", low) if desc else ("min", high)
    return SortKey(code, desc, Sql(f"COALESCE((SELECT {agg}({column}) FROM {table} WHERE "
                                   f"rid = {{rid}} AND pid = ?), {missing})", (pid,)))


# ------------------------------------------------------------------ parse

def _count(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):  # "²".isdigit() is True
        raise InvalidInput("_count must be a non-negative integer")
    return min(int(raw), MAX_COUNT)


def _include(raw: str, name: str) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidInput(f"{name} looks like Type:parameter[:TargetType], got {raw!r}")
    param = registry().param(parts[0], parts[1])
    if param is None or param.type != "reference":
        raise InvalidInput(f"{name}={raw}: {parts[0]} has no reference parameter {parts[1]!r}")
    return Include(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def parse(rtype: str, items: Sequence[tuple[str, str]], compiler: Compiler,
          strict: bool = False) -> Query:
    """A ``Query`` from the request's (name, value) pairs, in order."""
    q = Query(rtype)
    for name, raw in items:
        code = name.split(":")[0].split(".")[0]
        if code in RESULT_PARAMS:
            _result_param(q, rtype, name, raw, compiler)
            continue
        if name in ("patient", "subject", "patient:Patient", "subject:Patient") and \
                rtype != "*":  # not chains
            q.patient_refs.update(v.rstrip("/").split("/")[-1] for v in split_values(raw)
                                  if v)
        if rtype == "*":
            raise InvalidInput("a search across all types takes no parameters")
        cond = compiler.condition(rtype, name, raw)
        if cond is None:
            if strict:
                raise InvalidInput(f"unknown search parameter {name!r} for {rtype} "
                                   "(Prefer: handling=strict)")
            q.ignored.append(name)
            continue
        q.conditions.append(cond)
    return q


def _result_param(q: Query, rtype: str, name: str, raw: str, compiler: Compiler) -> None:
    if name == "_count":
        q.count = _count(raw)
    elif name == "_sort":
        q.sort = [sort_key(rtype, s, compiler.pid_of) for s in raw.split(",") if s]
    elif name == "_summary":
        if raw not in ("count", "false", "data"):
            raise InvalidInput("_summary supports count, data and false")
        q.summary = raw
    elif name == "_elements":
        q.elements = tuple(e.strip() for e in raw.split(",") if e.strip())
    elif name == "_include":
        q.include.append(_include(raw, name))
    elif name == "_revinclude":
        q.revinclude.append(_include(raw, name))
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise InvalidInput("_total is none, estimate or accurate")
        q.total = raw
    elif name == "_page":
        q.page = raw
