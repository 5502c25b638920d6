"""The policy vocabulary: data categories, sensitivity labels, roles, decisions, callers.

Everything here is data; the decisions that use it live beside it (``read``,
``write``, ``admin``, ``ledger``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medledger.core import state as st

ALL = "*"

CATEGORIES = (
    "demographics", "vital-signs", "laboratory", "medications", "allergies", "conditions",
    "procedures", "immunizations", "encounters", "mental-health", "social-history",
    "documents", "care-plan", "claims", "consent", "other", "directory",
)
DIRECTORY = "directory"
SENSITIVE_LABELS = frozenset({"PSY", "ETH", "HIV", "SDV", "SEX", "STD", "R", "V"})
LABEL_NAMES = {"PSY": "psychiatry / mental health", "ETH": "substance use", "HIV": "HIV/AIDS",
               "SDV": "sexual and domestic violence", "SEX": "sexuality and reproductive health",
               "STD": "sexually transmitted disease", "R": "restricted", "V": "very restricted"}
BREAK_GLASS_MIN_REASON = 10


@dataclass(frozen=True)
class Role:
    name: str
    read: frozenset[str]
    write: frozenset[str]
    labels: frozenset[str]
    break_glass: bool


def _cats(*names: str) -> frozenset[str]:
    return frozenset(names)


ROLES: dict[str, Role] = {
    "physician": Role("physician", _cats(ALL), _cats(ALL), frozenset(), True),
    "psychiatrist": Role("psychiatrist", _cats(ALL), _cats(ALL), frozenset({"PSY", "ETH"}), True),
    "nurse": Role("nurse",
                  _cats("demographics", "vital-signs", "medications", "allergies", "immunizations"),
                  _cats("vital-signs", "medications", "allergies", "immunizations"),
                  frozenset(), False),
    "admin-clerk": Role("admin-clerk", _cats("demographics"), _cats("demographics", DIRECTORY),
                        frozenset(), False),
}
# An organisation signing for itself (bulk import, registration) acts as a system role.
SYSTEM = Role("system", _cats(ALL), _cats(ALL), frozenset(SENSITIVE_LABELS), False)


@dataclass(frozen=True)
class Decision:
    """One answer. ``basis``: "patient-self", "care", "consent:<id>", "break-glass",
    "share:<id>", "directory", "member", "scope", "denied". ``disclose``: whether a
    denial may name the record (id, category, reason) to the caller — only to those who
    may see the patient at all; everyone else learns a count (no oracle)."""

    allowed: bool
    basis: str
    reason: str
    break_glass: bool = False
    disclose: bool = True


def allow(basis: str, reason: str) -> Decision:
    return Decision(True, basis, reason)


def deny(reason: str, *, disclose: bool = True, basis: str = "denied") -> Decision:
    return Decision(False, basis, reason, disclose=disclose)


@dataclass(frozen=True)
class Caller:
    """Who asks: their ledger entry as of now (an ``actor/`` entry, or an ``org/`` entry
    with ``kind: org``) and the SMART scopes of the token they present."""

    entry: Mapping[str, Any]
    scopes: frozenset[str]

    @property
    def id(self) -> str:
        return str(self.entry["id"])

    @property
    def kind(self) -> str:
        return str(self.entry["kind"])

    @property
    def org(self) -> str:
        return self.id if self.kind == "org" else str(self.entry.get("org"))

    @property
    def actor(self) -> dict[str, Any]:
        """The entry in the shape ``decide_read``/``decide_write`` take."""
        return {**self.entry, "org": self.org}

    @property
    def active(self) -> bool:
        if self.kind == "org":
            return self.entry.get("status") == "active"
        return st.is_active(dict(self.entry))

    def is_node_org(self, local_org: str) -> bool:
        """The organisation that runs the node answering (its operator)."""
        return self.kind == "org" and self.id == local_org and self.active


def role_covers(role: Role, category: str) -> bool:
    return ALL in role.read or category in role.read


def may_write(role: Role, category: str) -> bool:
    return ALL in role.write or category in role.write
