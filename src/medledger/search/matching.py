"""Patient matching on blocking keys: which existing patients ``$match`` and the
duplicate check on Patient create compare a new patient with.

Each Patient head gets blocking keys in the index (``blk``): identifiers, phone
numbers and e-mail addresses, family name + birth date, Soundex of the family name
+ birth year + initial of the first given name, family name + Soundex of the first
given name + birth month and day, Soundex of the first given name + birth date. A
new patient's keys select the candidates (an index lookup per key), only they are
decrypted and scored (``fhir.match``), and nothing keeps the population's
demographics in memory. The keys cover the situations of the match vectors:
spelling variants and nicknames (family + birth date), transposed or mistyped birth
dates (Soundex + year + initial for a day or month typo, family + given + month-day
for a year typo), changed family names (given + birth date), shared identifiers or
contact points.

Every name key also carries part of the birth date, so a key's patients do not grow
with the population the way a name alone does (version 1 had Soundex + year and
family + given: at a million patients ~50 candidates per ``$match`` instead of ~6).
``KEYS_VERSION`` names the key set; an index holding another version's keys has its
patients' keys recomputed (``search.sync`` on start, ``refresh_keys``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from medledger.fhir import match
from medledger.search.index import SearchIndex

KEYS_VERSION = "2"
MAX_PER_KEY = 200  # a key shared by more patients than this selects nothing (too common)
MAX_CANDIDATES = 500


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _names(patient: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(normalised family without spaces, normalised first given) of each name."""
    out = []
    for name in _as_list(patient.get("name")):
        if not isinstance(name, Mapping):
            continue
        family = match.normalize_name(str(name.get("family") or "")).replace(" ", "")
        given = [g for raw in _as_list(name.get("given"))
                 for g in match.normalize_name(str(raw)).split()]
        if not family and not given and name.get("text"):
            words = match.normalize_name(str(name["text"])).split()
            family, given = (words[-1], words[:-1]) if words else ("", [])
        out.append((family, given[0] if given else ""))
    return out


def blocking_keys(patient: Mapping[str, Any]) -> set[str]:
    keys: set[str] = set()
    for ident in _as_list(patient.get("identifier")):
        if isinstance(ident, Mapping) and ident.get("value") and ident.get("use") != "old":
            system = str(ident.get("system") or "").strip().rstrip("/")
            keys.add(f"id:{system}|{str(ident['value']).strip()}")
    for point in _as_list(patient.get("telecom")):
        if not isinstance(point, Mapping) or not isinstance(point.get("value"), str):
            continue
        value = point["value"].strip()
        if "@" in value:
            keys.add("email:" + value.lower())
        else:
            digits = "".join(ch for ch in value if ch.isdigit())
            if len(digits) >= 7:
                keys.add("phone:" + digits[-10:])
    birth = str(patient.get("birthDate") or "")[:10]
    year, month_day = birth[:4], birth[5:10] if len(birth) == 10 else ""
    for family, given in _names(patient):
        fam_sx, given_sx = match.soundex(family), match.soundex(given)
        if family and birth:
            keys.add(f"fd:{family}|{birth}")
        if fam_sx and year:
            keys.add(f"sy:{fam_sx}|{year}|{given[:1]}")
        if family and given_sx and month_day:
            keys.add(f"fg:{family}|{given_sx}|{month_day}")
        if given_sx and birth:
            keys.add(f"gd:{given_sx}|{birth}")
    return keys


def keys_stale(index: SearchIndex) -> bool:
    """Whether the index's Patients may hold blocking keys of another ``KEYS_VERSION``."""
    return index.meta_value("blocking") != KEYS_VERSION


def refresh_keys(index: SearchIndex, patients: Iterable[Mapping[str, Any]]) -> int:
    """Recompute the blocking keys of these (indexed) patients."""
    return index.replace_blocking_keys((str(p["id"]), blocking_keys(p)) for p in patients)


def mark_keys_current(index: SearchIndex) -> None:
    """Record that every indexed Patient now has this version's keys."""
    index.set_meta_value("blocking", KEYS_VERSION)


def candidate_ids(index: SearchIndex, patient: Mapping[str, Any]) -> list[str]:
    """Ids of indexed patients sharing a blocking key with ``patient`` (bounded)."""
    tid = index.tid("Patient")
    if tid is None:
        return []
    found: dict[str, None] = {}
    for key in sorted(blocking_keys(patient)):
        rows = index.query("SELECT res.id FROM blk JOIN res ON res.rid = blk.rid "
                           "WHERE blk.key = ? AND res.tid = ? LIMIT ?",
                           (key, tid, MAX_PER_KEY + 1))
        if len(rows) > MAX_PER_KEY:
            continue
        for (pid,) in rows:
            found[str(pid)] = None
        if len(found) >= MAX_CANDIDATES:
            break
    return list(found)[:MAX_CANDIDATES]


def score(candidate: Mapping[str, Any], existing: Iterable[Mapping[str, Any]],
          only_certain: bool = False, count: int | None = None
          ) -> list[tuple[Mapping[str, Any], match.MatchResult]]:
    return match.find_matches(candidate, existing, only_certain, count)
