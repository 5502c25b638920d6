"""Access policy: roles, patient consent, care relationships and break-the-glass.

Pure functions of ledger state answer every access question, so every node gives
the same answer: ``decide_read`` ("may this actor read this record now?") and
``decide_write`` ("may this writer put this version, over what is there?"). The
state machine enforces ``decide_write`` when a tx is applied; nodes call both
before they decrypt anything.

Order of a practitioner read decision:
1. an active *deny* consent that matches actor and record -> deny;
2. the role must cover the record's category;
3. every sensitivity label on the record must be covered by the role or by a
   *permit* consent naming that label (or category) for this actor or org;
4. the actor's org needs a care relationship with the patient, or a matching permit;
break-the-glass (physician or psychiatrist, reason required) overrides 1-4, flagged.

Directory records (``patient`` None: Organization, Practitioner, Location, ...,
ADR 5) are readable by every active member's staff and by patients, and writable
by organisations and the roles that write ``directory`` data.

Writes (``decide_write``): the role must write the category; a patient's *deny*
consent naming the writer (actor or organisation) refuses the write; the writer's
organisation needs a care relationship or a permit; overwriting a record needs the
right to read the version being replaced, or a flagged break-the-glass.
"""

from __future__ import annotations

from collections.abc import Iterable
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

BREAK_GLASS_MIN_REASON = 10


@dataclass(frozen=True)
class Decision:
    allowed: bool
    basis: str  # "patient-self", "care", "consent:<id>", "break-glass", "share:<id>", "denied"
    reason: str
    break_glass: bool = False


def role_covers(role: Role, category: str) -> bool:
    return ALL in role.read or category in role.read


def _applies_to_actor(rule: dict[str, Any], actor: dict[str, Any]) -> bool:
    actors, orgs = rule.get("actors") or [], rule.get("orgs") or []
    if not actors and not orgs:
        return True
    return actor["id"] in actors or actor.get("org") in orgs


def _applies_to_record(rule: dict[str, Any], category: str, labels: Iterable[str]) -> bool:
    cats, labs = rule.get("categories") or [], rule.get("labels") or []
    if not cats and not labs:
        return True
    return category in cats or bool(set(labs) & set(labels))


def _active(rule: dict[str, Any], now_s: int) -> bool:
    if rule.get("status") != "active":
        return False
    start, end = rule.get("start"), rule.get("end")
    return (start is None or start <= now_s) and (end is None or now_s < end)


def matching_consents(rules: list[dict[str, Any]], actor: dict[str, Any], category: str,
                      labels: Iterable[str], now_s: int, decision: str) -> list[dict[str, Any]]:
    labels = list(labels)
    return [r for r in rules
            if r["decision"] == decision and _active(r, now_s)
            and _applies_to_actor(r, actor) and _applies_to_record(r, category, labels)]


def _label_permitted(rules: list[dict[str, Any]], actor: dict[str, Any], category: str,
                     label: str, now_s: int) -> dict[str, Any] | None:
    for r in rules:
        if (r["decision"] == "permit" and _active(r, now_s) and _applies_to_actor(r, actor)
                and (label in (r.get("labels") or []) or category in (r.get("categories") or []))):
            return r
    return None


def decide_read(state: st.StateReader, actor: dict[str, Any], patient: str | None,
                category: str, labels: Iterable[str], now_s: int,
                break_glass_reason: str | None = None) -> Decision:
    """May ``actor`` (an ``actor/`` state entry) read a record of ``patient``?"""
    labels = frozenset(labels)
    if not st.is_active(actor):
        return Decision(False, "denied", f"{actor['id']} is deactivated")
    if patient is None:  # a directory record: shared by every member's staff
        if actor["kind"] in ("practitioner", "patient", "org"):
            return Decision(True, "directory", "directory record")
        return Decision(False, "denied", f"{actor['id']} may not read the directory")
    if actor["kind"] == "patient":
        if actor["id"] == patient:
            return Decision(True, "patient-self", "the patient's own record")
        return Decision(False, "denied", "patients may read only their own records")
    role = ROLES.get(actor.get("role", ""))
    if actor["kind"] != "practitioner" or role is None:
        return Decision(False, "denied", f"{actor['id']} has no clinical role")
    denial = _deny_reason(state, actor, role, patient, category, labels, now_s)
    if denial is None:
        return _grant_basis(state, actor, patient, category, labels, now_s)
    if break_glass_reason is not None:
        reason = break_glass_reason.strip()
        if not role.break_glass:
            return Decision(False, "denied", f"role {role.name} may not break the glass; "
                            + denial)
        if len(reason) < BREAK_GLASS_MIN_REASON:
            return Decision(False, "denied", "break-the-glass needs a reason of at least "
                            f"{BREAK_GLASS_MIN_REASON} characters")
        return Decision(True, "break-glass", f"emergency access: {reason} (overrode: {denial})",
                        break_glass=True)
    return Decision(False, "denied", denial)


def _deny_reason(state: st.StateReader, actor: dict[str, Any], role: Role, patient: str,
                 category: str, labels: frozenset[str], now_s: int) -> str | None:
    rules = st.consents(state, patient)
    denies = matching_consents(rules, actor, category, labels, now_s, "deny")
    if denies:
        return f"patient consent {denies[0]['id']} restricts {category} data for this actor"
    if not role_covers(role, category):
        return f"role {role.name} may not read {category} data"
    for label in sorted(labels & SENSITIVE_LABELS):
        if label not in role.labels and _label_permitted(rules, actor, category, label,
                                                         now_s) is None:
            return (f"record is labelled {label} ({LABEL_NAMES.get(label, label)}); role "
                    f"{role.name} needs the patient's consent")
    if not st.has_care(state, patient, actor["org"]) and not matching_consents(
            rules, actor, category, labels, now_s, "permit"):
        return (f"organisation {actor['org']} has no care relationship with this patient "
                "and no consent from them")
    return None


def _grant_basis(state: st.StateReader, actor: dict[str, Any], patient: str, category: str,
                 labels: frozenset[str], now_s: int) -> Decision:
    if st.has_care(state, patient, actor["org"]):
        return Decision(True, "care", f"care relationship of {actor['org']}")
    permits = matching_consents(st.consents(state, patient), actor, category, labels, now_s,
                                "permit")
    return Decision(True, f"consent:{permits[0]['id']}", "patient consent")


def writer_role(signer: dict[str, Any], author: dict[str, Any] | None) -> Role | None:
    """The role a record write is judged by: the author's, or SYSTEM for an org itself."""
    if author is None:
        return SYSTEM if signer["kind"] == "org" else None
    if author["kind"] != "practitioner":
        return None
    return ROLES.get(author.get("role", ""))


def may_write(role: Role, category: str) -> bool:
    return ALL in role.write or category in role.write


def org_writer(org_id: str) -> dict[str, Any]:
    """The pseudo-actor of an organisation writing for itself (bulk import)."""
    return {"id": org_id, "kind": "org", "org": org_id}


def decide_write(state: st.StateReader, writer: dict[str, Any], role: Role,
                 patient: str | None, category: str, labels: Iterable[str], now_s: int,
                 head: dict[str, Any] | None = None, break_glass: bool = False) -> Decision:
    """May ``writer`` (an actor entry, or ``org_writer``) judged as ``role`` put this
    version? ``head`` is the version it would replace. Denials name the rule."""
    labels = frozenset(labels)
    who = f"{writer['id']} ({role.name})"
    if not st.is_active(writer):
        return Decision(False, "denied", f"{writer['id']} is deactivated")
    if not may_write(role, category):
        return Decision(False, "denied", f"{who} may not write {category} data")
    if patient is None:
        return Decision(True, DIRECTORY, "directory record")
    rules = st.consents(state, patient)
    judged = [(category, labels)]
    if head is not None:  # what is replaced counts too: a denied PSY record stays denied
        judged.append((head["category"], frozenset(head["labels"])))
    for cat, labs in judged:
        denies = matching_consents(rules, writer, cat, labs, now_s, "deny")
        if denies:
            return Decision(False, "denied", f"patient consent {denies[0]['id']} denies "
                            f"{writer['id']} access to this patient's {cat} data, writes "
                            "included")
    has_care = st.has_care(state, patient, writer["org"])
    if not has_care and not matching_consents(rules, writer, category, labels, now_s,
                                              "permit"):
        return Decision(False, "denied", f"organisation {writer['org']} has no care "
                        f"relationship with patient {patient} and no consent from them")
    if head is not None:
        overwrite = _decide_overwrite(state, writer, role, head, now_s, break_glass)
        if overwrite is not None:
            return overwrite
    return Decision(True, "care" if has_care else "consent", "write permitted")


def _decide_overwrite(state: st.StateReader, writer: dict[str, Any], role: Role,
                      head: dict[str, Any], now_s: int, break_glass: bool) -> Decision | None:
    """A denial if ``writer`` may not replace ``head``; None if it may; a flagged
    break-glass decision if it may only by breaking the glass."""
    ref = f"{head['type']}/{head['id']}"
    if not may_write(role, head["category"]):
        return Decision(False, "denied", f"{writer['id']} ({role.name}) may not overwrite "
                        f"{ref}, a {head['category']} record")
    if writer["kind"] == "org":  # the organisation itself: care/consent already judged
        return None
    seen = decide_read(state, writer, head["patient"], head["category"], head["labels"],
                       now_s)
    if seen.allowed:
        return None
    if break_glass and role.break_glass:
        return Decision(True, "break-glass", f"overwrite of {ref} by break-the-glass "
                        f"(overrode: {seen.reason})", break_glass=True)
    return Decision(False, "denied", f"{writer['id']} ({role.name}) may not overwrite {ref}: "
                    f"they may not read the version it replaces ({seen.reason})"
                    + ("" if not role.break_glass else "; break the glass to override"))
