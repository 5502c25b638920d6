"""Typed search values, as FHIR search defines each parameter type.

Pure functions shared by extraction (what a resource holds) and queries (what a
client asks for): string normalisation, date precision ranges, reference parsing.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

# Dates are instants in milliseconds since 1970-01-01T00:00Z; a value is the half-open
# range [low, high) its precision covers ("2020" covers the whole year).
MIN_MS = -(2**62)
MAX_MS = 2**62
_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})"
    r"(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string (FHIR string search)."""
    if text.isascii():
        return " ".join(text.lower().split())
    folded = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return _SPACES.sub(" ", plain).strip()


def _ms(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def date_range(text: str) -> tuple[int, int] | None:
    """[low, high) in ms of a FHIR date, dateTime or instant; None if not one.

    A dateTime without a zone is taken as UTC (the spec leaves it to the server). The
    arithmetic is in whole milliseconds, so dates at the ends of the calendar (a birth
    date of 9999-12-31, 0001-01-01T00:30+01:00) have ranges too instead of overflowing.
    """
    m = _DATE_RE.match(text.strip())
    if m is None:
        return None
    g = m.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            return _ms(datetime(year, 1, 1, tzinfo=UTC)), _year_end_ms(year)
        month = int(g["m"])
        if g["d"] is None:
            return _ms(datetime(year, month, 1, tzinfo=UTC)), _month_end_ms(year, month)
        day = _ms(datetime(year, month, int(g["d"]), tzinfo=UTC))
    except ValueError:  # 2023-02-30 and the like
        return None
    if g["H"] is None:
        return day, day + _DAY_MS
    tz = g["tz"] or "Z"
    offset_min = 0 if tz == "Z" else (1 if tz[0] == "+" else -1) * (
        int(tz[1:3]) * 60 + int(tz[4:6]))
    lo = day + (int(g["H"]) * 60 + int(g["M"]) - offset_min) * 60_000
    if g["S"] is None:
        return lo, lo + 60_000
    lo += int(g["S"]) * 1000
    if g["f"] is None:
        return lo, lo + 1000
    frac = g["f"][:3]
    lo += int(frac.ljust(3, "0"))
    return lo, lo + 10 ** (3 - len(frac))


_DAY_MS = 86_400_000


def _year_end_ms(year: int) -> int:
    """The first millisecond after ``year`` (year 9999 included)."""
    return _ms(datetime(year, 12, 31, tzinfo=UTC)) + _DAY_MS


def _month_end_ms(year: int, month: int) -> int:
    """The first millisecond after ``month`` of ``year``."""
    if month == 12:
        return _year_end_ms(year)
    return _ms(datetime(year, month + 1, 1, tzinfo=UTC))


def decimal_of(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def implicit_range(text: str) -> tuple[float, float] | None:
    """The range a search number stands for by its precision: ``100`` is [99.5, 100.5),
    ``1e2`` likewise; None when ``text`` is not a number."""
    d = decimal_of(text)
    if d is None or not d.is_finite():
        return None
    exponent = d.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    return float(d - half), float(d + half)


def parse_reference(ref: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference (``Type/id``, an absolute URL, ``.../_history/n``);
    ("", value) for an id or urn without a type; None for contained (``#x``) refs."""
    ref = ref.strip()
    if not ref or ref.startswith("#"):
        return None
    if ref.startswith(("urn:uuid:", "urn:oid:")):
        return "", ref
    parts = ref.split("?")[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalnum():
        return parts[-2], parts[-1]
    return "", parts[-1]
