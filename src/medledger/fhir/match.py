"""Probabilistic patient matching for ``Patient/$match`` and duplicate checks.

This module owns how two FHIR ``Patient`` resources are compared. It follows the
Fellegi-Sunter model: each field (identifier, family name, given name, birth date,
gender, address, telecom) is compared at a few agreement levels, every level has a
log2 likelihood-ratio weight (how much more often it happens for the same person
than for two different people), weights are summed and the sum is mapped to a
match probability. Missing fields weigh nothing: absence is not disagreement.

Independence between fields is the model's known weakness (twins agree on family
name, birth date, address and phone), so a few explicit rules then bound the
score: a clearly different given name or birth date never exceeds "possible"
without an agreeing identifier, and "certain" needs an agreeing identifier or
exact family name, given name and birth date.

Grades follow the FHIR match-grade extension: ``certain`` (>= 0.95),
``probable`` (>= 0.80), ``possible`` (>= 0.60), else no grade. Reasons are short
PHI-free phrases naming which fields agreed or disagreed, safe for logs.

String comparison (Jaro-Winkler, Soundex) is ``jellyfish``'s. Everything is pure and
deterministic: no I/O, no clock, no randomness. Which patients are compared is the
search package's business (``search.matching``: blocking keys in the index).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jellyfish

from medledger.errors import InvalidInput

__all__ = [
    "MATCH_GRADE_URL",
    "MatchResult",
    "find_matches",
    "grade_for",
    "jaro_winkler",
    "match_bundle",
    "match_score",
    "nickname_of",
    "normalize_name",
    "parse_match_parameters",
    "soundex",
]

Grade = Literal["certain", "probable", "possible"]

MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"
CERTAIN = 0.95
PROBABLE = 0.80
POSSIBLE = 0.60
# Score ceilings used by the rules that correct for correlated fields.
_BELOW_CERTAIN = 0.94
_BELOW_PROBABLE = 0.79

# log2 likelihood-ratio weights, log2(m/u) for agreement, log2((1-m)/(1-u)) against.
_W_IDENTIFIER = 23.0  # m 0.95, u 1e-7: an MRN/SSN collision is very rare
_W_IDENTIFIER_CONFLICT = -4.3
_W_FAMILY = {"exact": 6.6, "similar": 4.0, "partial": 3.0, "phonetic": 2.0, "differs": -4.3}
_W_GIVEN = {
    "exact": 6.0,
    "nickname": 3.5,
    "similar": 3.0,
    "other-given": 2.5,
    "initial": 1.5,
    "phonetic": 1.0,
    "differs": -4.3,
}
_W_BIRTH = {
    "exact": 10.9,
    "year-month": 6.0,
    "year": 3.5,
    "transposed": 6.0,
    "one-digit": 5.0,
    "year-off-by-one": 5.0,
    "differs": -5.0,
}
_W_GENDER = {"agrees": 1.0, "differs": -4.6}
_W_POSTAL = {"agrees": 3.0, "differs": -1.0}
_W_LINE = {"agrees": 4.5, "differs": -0.5}
_W_CITY = {"agrees": 1.0, "differs": -0.5}
_W_TELECOM = {"agrees": 6.0, "differs": -1.0}
# Prior: log2 odds that two records picked for comparison are the same person.
_THRESHOLD = 17.0
# How sharply a ceiling bends scores that approach it (see _soft_ceiling).
_SHARPNESS = 4.0


@dataclass(frozen=True)
class MatchResult:
    """How likely two Patient records describe the same person, and why."""

    score: float
    grade: Grade | None
    reasons: tuple[str, ...]


def grade_for(score: float) -> Grade | None:
    """The FHIR match-grade code for a score in [0, 1]."""
    if score >= CERTAIN:
        return "certain"
    if score >= PROBABLE:
        return "probable"
    if score >= POSSIBLE:
        return "possible"
    return None


# ------------------------------------------------------------------ string tools


_DROP = re.compile(r"['\u2019`.]")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPECIAL = str.maketrans({"ß": "ss", "æ": "ae", "ø": "o", "đ": "d", "ł": "l", "þ": "th"})


def normalize_name(text: str) -> str:
    """Lower case, accents and apostrophes removed, other punctuation to single spaces.

    ``"O'Brien-Núñez "`` -> ``"obrien nunez"``.
    """
    folded = unicodedata.normalize("NFKD", text.casefold().translate(_SPECIAL))
    plain = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return _NON_ALNUM.sub(" ", _DROP.sub("", plain)).strip()


def jaro_winkler(a: str, b: str) -> float:
    """Jaro-Winkler similarity in [0, 1] (1 = identical), common prefix up to 4
    (``jellyfish``)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return float(jellyfish.jaro_winkler_similarity(a, b))


def soundex(name: str) -> str:
    """American Soundex (``"Robert"`` -> ``"R163"``) of the name's letters after
    normalisation (``jellyfish``); empty string for no letters."""
    letters = "".join(ch for ch in normalize_name(name) if "a" <= ch <= "z")
    return str(jellyfish.soundex(letters)) if letters else ""


# Each group: a formal name, its spelling variants and its common short forms.
_NICKNAME_GROUPS: tuple[tuple[str, ...], ...] = (
    ("robert", "bob", "bobby", "rob", "robbie", "bert"),
    ("william", "bill", "billy", "will", "willie", "willy", "liam"),
    ("elizabeth", "liz", "lizzie", "beth", "betty", "betsy", "eliza", "libby", "elisabeth"),
    ("margaret", "peggy", "maggie", "meg", "marge", "margie", "greta", "margo"),
    ("james", "jim", "jimmy", "jamie"),
    ("katherine", "catherine", "kathryn", "katharine", "kate", "kathy", "katie", "kat", "kitty"),
    ("richard", "dick", "rick", "ricky", "rich", "richie"),
    ("john", "jack", "johnny"),
    ("jonathan", "jon", "jonny", "nathan"),
    ("michael", "mike", "mikey", "mick", "mickey"),
    ("thomas", "tom", "tommy"),
    ("charles", "charlie", "chuck", "chas"),
    ("edward", "ed", "eddie", "ted", "ned"),
    ("theodore", "ted", "teddy", "theo"),
    ("joseph", "joe", "joey"),
    ("daniel", "dan", "danny"),
    ("david", "dave", "davey"),
    ("anthony", "tony"),
    ("christopher", "chris", "kit"),
    ("christine", "christina", "chris", "tina", "chrissy"),
    ("matthew", "matt"),
    ("nicholas", "nick", "nicky"),
    ("andrew", "andy", "drew"),
    ("alexander", "alex", "sasha", "sandy", "xander"),
    ("alexandra", "alex", "sasha", "sandra", "lexi"),
    ("steven", "stephen", "steve", "stevie"),
    ("patricia", "pat", "patty", "trish", "tricia"),
    ("patrick", "pat", "paddy"),
    ("jennifer", "jen", "jenny"),
    ("susan", "sue", "susie", "suzanne"),
    ("deborah", "debra", "deb", "debbie"),
    ("rebecca", "becky", "becca"),
    ("victoria", "vicky", "tori"),
    ("samuel", "sam", "sammy"),
    ("samantha", "sam", "sammy"),
    ("benjamin", "ben", "benny"),
    ("timothy", "tim", "timmy"),
    ("gregory", "greg"),
    ("lawrence", "laurence", "larry"),
    ("henry", "hank", "harry"),
    ("harold", "harry", "hal"),
    ("francis", "frances", "fran", "frank", "frankie"),
    ("dorothy", "dot", "dottie", "dolly"),
    ("abigail", "abby", "gail"),
    ("alfred", "alf", "alfie", "fred", "freddie"),
    ("frederick", "fred", "freddie", "fritz"),
    ("jacqueline", "jackie"),
    ("kimberly", "kim"),
    ("kenneth", "ken", "kenny"),
    ("donald", "don", "donnie"),
    ("ronald", "ron", "ronnie"),
    ("gerald", "gerry", "jerry"),
    ("peter", "pete"),
    ("raymond", "ray"),
    ("mary", "molly", "polly", "mae", "mamie"),
    ("ann", "anne", "anna", "annie", "nancy", "nan"),
    ("helen", "nell", "nellie", "ellen"),
    ("sarah", "sara", "sally", "sadie"),
    ("josephine", "jo", "josie"),
    ("virginia", "ginny", "ginger"),
    ("barbara", "barb", "babs"),
    ("eleanor", "ellie", "nora", "elle"),
    ("jose", "pepe"),
    ("francisco", "paco", "pancho", "frank"),
    ("guillermo", "memo"),
    ("johann", "johannes", "hans"),
    ("vladimir", "vova", "volodya"),
    ("ekaterina", "katya"),
)


def _build_nickname_index() -> dict[str, frozenset[int]]:
    index: dict[str, set[int]] = {}
    for number, group in enumerate(_NICKNAME_GROUPS):
        for name in group:
            index.setdefault(name, set()).add(number)
    return {name: frozenset(groups) for name, groups in index.items()}


_NICKNAME_INDEX = _build_nickname_index()


def nickname_of(a: str, b: str) -> bool:
    """True when two (normalised) given names are known variants of one name."""
    if a == b:
        return False
    return bool(_NICKNAME_INDEX.get(a, frozenset()) & _NICKNAME_INDEX.get(b, frozenset()))


# --------------------------------------------------------------------- features


@dataclass(frozen=True)
class _Name:
    family: str  # normalised, spaces kept
    given: tuple[str, ...]  # normalised given names, in order


@dataclass(frozen=True)
class _Address:
    line: str
    city: str
    postal: str


@dataclass(frozen=True)
class _Features:
    identifiers: frozenset[tuple[str, str]]
    names: tuple[_Name, ...]
    birth: str
    gender: str
    addresses: tuple[_Address, ...]
    telecom: frozenset[str]


_STREET_WORDS = {
    "street": "st",
    "avenue": "ave",
    "av": "ave",
    "road": "rd",
    "drive": "dr",
    "lane": "ln",
    "boulevard": "blvd",
    "court": "ct",
    "place": "pl",
    "square": "sq",
    "terrace": "ter",
    "highway": "hwy",
    "parkway": "pkwy",
    "apartment": "apt",
    "suite": "ste",
    "unit": "apt",
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
    "number": "no",
}
_BIRTH_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _names(patient: Mapping[str, Any]) -> tuple[_Name, ...]:
    out: list[_Name] = []
    for name in _as_list(patient.get("name")):
        if not isinstance(name, Mapping):
            continue
        family = normalize_name(_text(name.get("family")))
        given = tuple(
            part
            for raw in _as_list(name.get("given"))
            for part in normalize_name(_text(raw)).split()
        )
        if not family and not given and name.get("text"):
            words = normalize_name(_text(name.get("text"))).split()
            family, given = (words[-1], tuple(words[:-1])) if words else ("", ())
        if family or given:
            out.append(_Name(family=family, given=given))
    return tuple(out)


def _address_line(lines: Iterable[Any]) -> str:
    words = normalize_name(" ".join(_text(x) for x in lines)).split()
    return " ".join(_STREET_WORDS.get(w, w) for w in words)


def _addresses(patient: Mapping[str, Any]) -> tuple[_Address, ...]:
    out: list[_Address] = []
    for addr in _as_list(patient.get("address")):
        if not isinstance(addr, Mapping):
            continue
        postal = re.sub(r"[^0-9A-Z]", "", _text(addr.get("postalCode")).upper())
        entry = _Address(
            line=_address_line(_as_list(addr.get("line"))),
            city=normalize_name(_text(addr.get("city"))),
            postal=postal,
        )
        if entry.line or entry.city or entry.postal:
            out.append(entry)
    return tuple(out)


def _telecom(patient: Mapping[str, Any]) -> frozenset[str]:
    out: set[str] = set()
    for point in _as_list(patient.get("telecom")):
        if not isinstance(point, Mapping):
            continue
        value = _text(point.get("value")).strip()
        system = _text(point.get("system"))
        if system == "email" or ("@" in value and system in ("", "other")):
            if "@" in value:
                out.add("email:" + value.lower())
            continue
        if system not in ("phone", "sms", "fax", "pager", ""):
            continue
        digits = re.sub(r"\D", "", value)
        if len(digits) >= 7:
            out.add("phone:" + digits[-10:])
    return frozenset(out)


def _identifiers(patient: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for ident in _as_list(patient.get("identifier")):
        if not isinstance(ident, Mapping) or ident.get("use") == "old":
            continue
        system = _text(ident.get("system")).strip().rstrip("/")
        value = _text(ident.get("value")).strip()
        if value:
            out.add((system, value))
    return frozenset(out)


def _features(patient: Mapping[str, Any]) -> _Features:
    if not isinstance(patient, Mapping):
        raise InvalidInput("patient matching needs Patient resources as JSON objects")
    gender = _text(patient.get("gender")).lower()
    return _Features(
        identifiers=_identifiers(patient),
        names=_names(patient),
        birth=_text(patient.get("birthDate")).strip(),
        gender="" if gender in ("unknown", "") else gender,
        addresses=_addresses(patient),
        telecom=_telecom(patient),
    )


# ------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class _Field:
    """One field's comparison: its weight, the reason, and any score ceiling."""

    weight: float
    reason: str
    cap: float | None = None


def _compare_identifiers(a: _Features, b: _Features) -> _Field | None:
    if not a.identifiers or not b.identifiers:
        return None
    if a.identifiers & b.identifiers:
        return _Field(_W_IDENTIFIER, "identifier: same system and value")
    shared_systems = {s for s, _ in a.identifiers if s} & {s for s, _ in b.identifiers if s}
    if shared_systems:
        return _Field(
            _W_IDENTIFIER_CONFLICT,
            "identifier: different value in the same system",
            cap=_BELOW_PROBABLE,
        )
    return None


def _family_level(a: str, b: str) -> tuple[str, float]:
    a_joined, b_joined = a.replace(" ", ""), b.replace(" ", "")
    if a_joined == b_joined:
        return "exact", 1.0
    sim = jaro_winkler(a_joined, b_joined)
    same_sound = soundex(a_joined) == soundex(b_joined)
    if sim >= 0.94 or (same_sound and sim >= 0.88):
        return "similar", sim
    if set(a.split()) & set(b.split()):
        return "partial", sim
    if same_sound or sim >= 0.88:
        return "phonetic", sim
    return "differs", sim


def _given_level(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, float]:
    first_a, first_b = a[0], b[0]
    if first_a == first_b:
        return "exact", 1.0
    if nickname_of(first_a, first_b):
        return "nickname", 1.0
    sim = jaro_winkler(first_a, first_b)
    same_sound = soundex(first_a) == soundex(first_b)
    if sim >= 0.92 or (same_sound and sim >= 0.85):
        return "similar", sim
    if set(a) & set(b):
        return "other-given", sim
    if (len(first_a) == 1 or len(first_b) == 1) and first_a[0] == first_b[0]:
        return "initial", sim
    if same_sound:
        return "phonetic", sim
    return "differs", sim


_LEVEL_ORDER = {
    level: rank
    for rank, level in enumerate(
        ["exact", "nickname", "similar", "other-given", "partial", "initial", "phonetic", "differs"]
    )
}


def _compare_names(a: _Features, b: _Features) -> list[_Field]:
    """Family and given name, taking the best-agreeing pair of HumanNames."""
    best_family: tuple[int, float, str] | None = None
    best_given: tuple[int, float, str] | None = None
    for na in a.names:
        for nb in b.names:
            if na.family and nb.family:
                level, sim = _family_level(na.family, nb.family)
                key = (_LEVEL_ORDER[level], -sim, level)
                best_family = key if best_family is None or key < best_family else best_family
            if na.given and nb.given:
                level, sim = _given_level(na.given, nb.given)
                key = (_LEVEL_ORDER[level], -sim, level)
                best_given = key if best_given is None or key < best_given else best_given
    fields: list[_Field] = []
    if best_family is not None:
        _, neg_sim, level = best_family
        detail = "" if level == "exact" else f" (jaro-winkler {-neg_sim:.2f})"
        fields.append(_Field(_W_FAMILY[level], f"family name: {level}{detail}"))
    if best_given is not None:
        _, neg_sim, level = best_given
        detail = "" if level in ("exact", "nickname") else f" (jaro-winkler {-neg_sim:.2f})"
        cap = _BELOW_PROBABLE if level == "differs" else None
        fields.append(_Field(_W_GIVEN[level], f"given name: {level}{detail}", cap=cap))
    return fields


def _one_digit_apart(a: str, b: str) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1


def _birth_level(a: str, b: str) -> str | None:
    ma, mb = _BIRTH_RE.match(a), _BIRTH_RE.match(b)
    if not ma or not mb:
        return None
    ya, mona, da = ma.groups()
    yb, monb, db = mb.groups()
    if da and db and mona and monb:
        if (ya, mona, da) == (yb, monb, db):
            return "exact"
        if ya == yb and (mona, da) == (db, monb):
            return "transposed"
        if (mona, da) == (monb, db) and abs(int(ya) - int(yb)) == 1:
            return "year-off-by-one"
        if _one_digit_apart(ya + mona + da, yb + monb + db):
            return "one-digit"
        return "differs"
    if mona and monb:  # at least one is year-month only
        if (ya, mona) == (yb, monb):
            return "year-month"
        return "differs"
    return "year" if ya == yb else "differs"


def _compare_birth(a: _Features, b: _Features) -> _Field | None:
    if not a.birth or not b.birth:
        return None
    level = _birth_level(a.birth, b.birth)
    if level is None:
        return None
    cap = _BELOW_PROBABLE if level == "differs" else None
    label = {
        "transposed": "day and month transposed",
        "one-digit": "one digit differs",
        "year-off-by-one": "year off by one",
    }.get(level, level)
    return _Field(_W_BIRTH[level], f"birth date: {label}", cap=cap)


def _compare_gender(a: _Features, b: _Features) -> _Field | None:
    if not a.gender or not b.gender:
        return None
    level = "agrees" if a.gender == b.gender else "differs"
    return _Field(_W_GENDER[level], f"gender: {level}")


def _compare_address(a: _Features, b: _Features) -> list[_Field]:
    best: list[_Field] = []
    best_total = -math.inf
    for aa in a.addresses:
        for ab in b.addresses:
            fields: list[_Field] = []
            for name, x, y, weights in (
                ("postal code", aa.postal, ab.postal, _W_POSTAL),
                ("street line", aa.line, ab.line, _W_LINE),
                ("city", aa.city, ab.city, _W_CITY),
            ):
                if x and y:
                    level = "agrees" if x == y else "differs"
                    fields.append(_Field(weights[level], f"address {name}: {level}"))
            total = sum(f.weight for f in fields)
            if fields and total > best_total:
                best, best_total = fields, total
    return best


def _compare_telecom(a: _Features, b: _Features) -> _Field | None:
    if not a.telecom or not b.telecom:
        return None
    if a.telecom & b.telecom:
        return _Field(_W_TELECOM["agrees"], "telecom: same phone or email")
    return _Field(_W_TELECOM["differs"], "telecom: no phone or email in common")


def _exact(fields: Sequence[_Field], prefix: str) -> bool:
    return any(f.reason == f"{prefix}: exact" for f in fields)


def _score_features(a: _Features, b: _Features) -> MatchResult:
    fields: list[_Field] = []
    identifier = _compare_identifiers(a, b)
    if identifier is not None:
        fields.append(identifier)
    fields.extend(_compare_names(a, b))
    for field in (_compare_birth(a, b), _compare_gender(a, b)):
        if field is not None:
            fields.append(field)
    fields.extend(_compare_address(a, b))
    telecom = _compare_telecom(a, b)
    if telecom is not None:
        fields.append(telecom)
    if not fields:
        return MatchResult(0.0, None, ("no comparable fields",))

    log_odds = sum(f.weight for f in fields) - _THRESHOLD
    reasons = [f.reason for f in fields]
    ceilings = _ceilings(fields)
    for ceiling, why in ceilings:
        bounded = _soft_ceiling(log_odds, ceiling)
        if log_odds - bounded > 0.01:
            reasons.append(f"ceiling: {why}")
        log_odds = bounded
    score = round(_probability(log_odds), 4)
    if ceilings:  # rounding must never lift a bounded score over its ceiling
        score = min(score, min(c for c, _ in ceilings))
    return MatchResult(score=score, grade=grade_for(score), reasons=tuple(reasons))


def _probability(log2_odds: float) -> float:
    if log2_odds > 60:
        return 1.0
    if log2_odds < -60:
        return 0.0
    return 1.0 / (1.0 + math.pow(2.0, -log2_odds))


def _soft_ceiling(log2_odds: float, ceiling: float) -> float:
    """Keep log-odds below ``ceiling`` (a probability) while preserving their order.

    A smooth minimum in the log-odds domain (sharpness 4): well below the ceiling
    it changes nothing, far above it approaches the ceiling, and more evidence
    still ranks higher (twins sharing a phone above twins who do not).
    """
    limit = math.log2(ceiling / (1.0 - ceiling))
    gap = log2_odds - limit
    if gap < -16:
        return log2_odds
    if gap > 16:
        return limit
    return limit - math.log2(1.0 + math.pow(2.0, -_SHARPNESS * gap)) / _SHARPNESS


def _ceilings(fields: Sequence[_Field]) -> list[tuple[float, str]]:
    """The rules that correct for correlated fields: (probability ceiling, why)."""
    if _exact_identifier(fields):
        disagreements = [
            f
            for f in fields
            if f.reason.startswith(
                ("family name: differs", "given name: differs", "birth date: differs")
            )
        ]
        if len(disagreements) >= 2:
            return [(_BELOW_PROBABLE, "identifier agrees but name and birth date disagree")]
        return []
    out = [(f.cap, f.reason) for f in fields if f.cap is not None]
    demographics_exact = (
        _exact(fields, "family name")
        and _exact(fields, "given name")
        and _exact(fields, "birth date")
    )
    if not demographics_exact:
        out.append((_BELOW_CERTAIN, "certain needs an identifier or exact name and birth date"))
    return out


def _exact_identifier(fields: Sequence[_Field]) -> bool:
    return any(f.reason == "identifier: same system and value" for f in fields)


def match_score(candidate: Mapping[str, Any], existing: Mapping[str, Any]) -> MatchResult:
    """Score how likely ``candidate`` and ``existing`` Patients are the same person."""
    return _score_features(_features(candidate), _features(existing))


# ------------------------------------------------------------------ $match API


def _sort_key(item: tuple[Mapping[str, Any], MatchResult]) -> tuple[float, str]:
    return (-item[1].score, _text(item[0].get("id")))


def find_matches(
    candidate: Mapping[str, Any],
    existing: Iterable[Mapping[str, Any]],
    only_certain: bool = False,
    count: int | None = None,
) -> list[tuple[Mapping[str, Any], MatchResult]]:
    """Graded matches (possible or better) for ``candidate``, best first.

    With ``only_certain`` the answer is the single certain match, or nothing when
    there are none or several (the $match rule: never guess between candidates).
    ``count`` limits how many are returned.
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise InvalidInput(f"$match count must be a positive integer, got {count!r}")
    wanted = _features(candidate)
    results = []
    for patient in existing:
        result = _score_features(wanted, _features(patient))
        if result.grade is not None:
            results.append((patient, result))
    results.sort(key=_sort_key)
    if only_certain:
        certain = [r for r in results if r[1].grade == "certain"]
        results = certain if len(certain) == 1 else []
    return results[:count] if count is not None else results


def match_bundle(
    results: Sequence[tuple[Mapping[str, Any], MatchResult]], base_url: str
) -> dict[str, Any]:
    """The ``Patient/$match`` response: a searchset Bundle with score and match-grade."""
    base = base_url.rstrip("/")
    entries: list[dict[str, Any]] = []
    for patient, result in results:
        search: dict[str, Any] = {}
        if result.grade is not None:
            search["extension"] = [{"url": MATCH_GRADE_URL, "valueCode": result.grade}]
        search["mode"] = "match"
        search["score"] = result.score
        entry: dict[str, Any] = {}
        patient_id = _text(patient.get("id"))
        if patient_id:
            entry["fullUrl"] = f"{base}/Patient/{patient_id}"
        entry["resource"] = dict(patient)
        entry["search"] = search
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def parse_match_parameters(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool, int | None]:
    """Read a ``Patient/$match`` Parameters body: (resource, onlyCertainMatches, count)."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "Parameters":
        raise InvalidInput("Patient/$match expects a FHIR Parameters resource as the body")
    resource: dict[str, Any] | None = None
    only_certain = False
    count: int | None = None
    for param in _as_list(body.get("parameter")):
        if not isinstance(param, Mapping):
            raise InvalidInput("each Parameters.parameter must be a JSON object")
        name = param.get("name")
        if name == "resource":
            value = param.get("resource")
            if not isinstance(value, Mapping) or value.get("resourceType") != "Patient":
                raise InvalidInput("$match parameter 'resource' must hold a Patient resource")
            if resource is not None:
                raise InvalidInput("$match takes exactly one 'resource' parameter, got several")
            resource = dict(value)
        elif name == "onlyCertainMatches":
            flag = param.get("valueBoolean")
            if not isinstance(flag, bool):
                raise InvalidInput("$match parameter 'onlyCertainMatches' needs a valueBoolean")
            only_certain = flag
        elif name == "count":
            number = param.get("valueInteger")
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise InvalidInput("$match parameter 'count' needs a positive valueInteger")
            count = number
        else:
            raise InvalidInput(f"$match does not know the parameter {name!r}")
    if resource is None:
        raise InvalidInput("$match needs a 'resource' parameter holding the Patient to match")
    return resource, only_certain, count
