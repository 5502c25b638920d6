"""core.policy.decide_read: roles, labels, consent (actor, category, label, period),
care relationships and break-the-glass, as a decision table.

State is built directly in the shapes ``core.machine`` writes (``care/``, ``consent/``).
"""

from __future__ import annotations

from typing import Any

import pytest

from medledger.core import policy
from medledger.core import state as st
from medledger.crypto.canonical import canonical

NOW = 1_700_000_000
HOUR = 3600
REASON = "patient unconscious in ER, suspected overdose"

ACTORS: dict[str, dict[str, Any]] = {
    "phys": {"id": "dr-phys", "kind": "practitioner", "org": "org-a", "role": "physician"},
    "nurse": {"id": "nurse-n", "kind": "practitioner", "org": "org-a", "role": "nurse"},
    "psy": {"id": "dr-psy", "kind": "practitioner", "org": "org-a", "role": "psychiatrist"},
    "clerk": {"id": "clerk", "kind": "practitioner", "org": "org-a", "role": "admin-clerk"},
    "surgeon": {"id": "dr-cut", "kind": "practitioner", "org": "org-a", "role": "surgeon"},
    "phys_b": {"id": "dr-b", "kind": "practitioner", "org": "org-b", "role": "physician"},
    "nurse_b": {"id": "nurse-b", "kind": "practitioner", "org": "org-b", "role": "nurse"},
    "pat1": {"id": "pat-1", "kind": "patient", "org": "org-a"},
    "pat2": {"id": "pat-2", "kind": "patient", "org": "org-a"},
}
RECORDS: dict[str, tuple[str, list[str]]] = {
    "vitals": ("vital-signs", []),
    "vitals_psy": ("vital-signs", ["PSY"]),
    "mental": ("mental-health", ["PSY"]),
    "lab_hiv": ("laboratory", ["HIV"]),
    "lab": ("laboratory", []),
    "demo": ("demographics", []),
}


def consent(cid: str, decision: str = "permit", *, actors: list[str] | None = None,
            orgs: list[str] | None = None, categories: list[str] | None = None,
            labels: list[str] | None = None, start: int | None = None,
            end: int | None = None, status: str = "active") -> dict[str, Any]:
    return {"id": cid, "patient": "pat-1", "decision": decision, "status": status,
            "recorded_ns": 0, "actors": actors or [], "orgs": orgs or [],
            "categories": categories or [], "labels": labels or [], "start": start, "end": end,
            "version": 1}


def state_with(consents: list[dict[str, Any]]) -> st.MemoryState:
    data = {"care/pat-1/org-a": b"1"}
    data.update({f"consent/pat-1/{r['id']}": canonical(r) for r in consents})
    return st.MemoryState(data)


PSY_FOR_PHYS = consent("c-psy", actors=["dr-phys"], labels=["PSY"])

# (name, actor, record, consents, break-glass reason, allowed, basis, break_glass)
TABLE: list[tuple[str, str, str, list[dict[str, Any]], str | None, bool, str, bool]] = [
    # roles and labels
    ("nurse sees vital signs", "nurse", "vitals", [], None, True, "care", False),
    ("nurse does not see mental health", "nurse", "mental", [], None, False, "denied", False),
    ("nurse does not see PSY-labelled vitals", "nurse", "vitals_psy", [], None, False,
     "denied", False),
    ("nurse sees PSY vitals with consent naming PSY", "nurse", "vitals_psy",
     [consent("c", actors=["nurse-n"], labels=["PSY"])], None, True, "care", False),
    ("psychiatrist sees PSY", "psy", "mental", [], None, True, "care", False),
    ("psychiatrist does not see HIV", "psy", "lab_hiv", [], None, False, "denied", False),
    ("physician sees vitals", "phys", "vitals", [], None, True, "care", False),
    ("physician denied PSY without consent", "phys", "mental", [], None, False, "denied",
     False),
    ("physician allowed PSY with permit naming PSY", "phys", "mental", [PSY_FOR_PHYS], None,
     True, "care", False),
    ("physician allowed PSY with permit naming the category", "phys", "mental",
     [consent("c", actors=["dr-phys"], categories=["mental-health"])], None, True, "care",
     False),
    ("physician allowed PSY with permit for the whole org", "phys", "mental",
     [consent("c", orgs=["org-a"], labels=["PSY"])], None, True, "care", False),
    ("blanket permit does not unlock sensitive labels", "phys", "mental", [consent("c")],
     None, False, "denied", False),
    ("permit naming another actor does not help", "phys", "mental",
     [consent("c", actors=["dr-psy"], labels=["PSY"])], None, False, "denied", False),
    ("permit naming another label does not help", "phys", "mental",
     [consent("c", actors=["dr-phys"], labels=["HIV"])], None, False, "denied", False),
    ("revoked permit does not help", "phys", "mental",
     [consent("c", actors=["dr-phys"], labels=["PSY"], status="inactive")], None, False,
     "denied", False),
    ("clerk sees demographics", "clerk", "demo", [], None, True, "care", False),
    ("clerk does not see vitals", "clerk", "vitals", [], None, False, "denied", False),
    ("unknown role is denied", "surgeon", "vitals", [], None, False, "denied", False),
    # patients
    ("patient reads own PSY record", "pat1", "mental", [], None, True, "patient-self", False),
    ("patient reads own record despite a deny", "pat1", "vitals", [consent("d", "deny")], None,
     True, "patient-self", False),
    ("patient does not read another patient", "pat2", "vitals", [], None, False, "denied",
     False),
    # deny consent
    ("deny naming the physician blocks", "phys", "vitals",
     [consent("d", "deny", actors=["dr-phys"])], None, False, "denied", False),
    ("deny naming the physician leaves the nurse", "nurse", "vitals",
     [consent("d", "deny", actors=["dr-phys"])], None, True, "care", False),
    ("deny by category blocks everyone", "nurse", "vitals",
     [consent("d", "deny", categories=["vital-signs"])], None, False, "denied", False),
    ("deny by category leaves other categories", "phys", "lab",
     [consent("d", "deny", categories=["vital-signs"])], None, True, "care", False),
    ("deny beats a permit", "phys", "mental",
     [PSY_FOR_PHYS, consent("d", "deny", labels=["PSY"])], None, False, "denied", False),
    ("deny for the org blocks its staff", "psy", "mental", [consent("d", "deny", orgs=["org-a"])],
     None, False, "denied", False),
    ("revoked deny does not block", "phys", "vitals",
     [consent("d", "deny", actors=["dr-phys"], status="inactive")], None, True, "care", False),
    # consent periods
    ("deny not yet started", "phys", "vitals",
     [consent("d", "deny", start=NOW + 1)], None, True, "care", False),
    ("deny starting now", "phys", "vitals", [consent("d", "deny", start=NOW)], None, False,
     "denied", False),
    ("deny ended (end is exclusive)", "phys", "vitals",
     [consent("d", "deny", start=NOW - HOUR, end=NOW)], None, True, "care", False),
    ("deny in its period", "phys", "vitals",
     [consent("d", "deny", start=NOW - HOUR, end=NOW + 1)], None, False, "denied", False),
    ("PSY permit expired", "phys", "mental",
     [consent("c", actors=["dr-phys"], labels=["PSY"], end=NOW - 1)], None, False, "denied",
     False),
    ("PSY permit in the future", "phys", "mental",
     [consent("c", actors=["dr-phys"], labels=["PSY"], start=NOW + HOUR)], None, False,
     "denied", False),
    # other organisations
    ("other-org physician needs consent", "phys_b", "vitals", [], None, False, "denied", False),
    ("other-org physician with org permit", "phys_b", "vitals", [consent("c", orgs=["org-b"])],
     None, True, "consent:c", False),
    ("other-org physician with actor permit", "phys_b", "lab",
     [consent("c", actors=["dr-b"], categories=["laboratory"])], None, True, "consent:c",
     False),
    ("other-org permit limited to a category", "phys_b", "vitals",
     [consent("c", actors=["dr-b"], categories=["laboratory"])], None, False, "denied", False),
    ("other-org permit expired", "phys_b", "vitals",
     [consent("c", orgs=["org-b"], start=NOW - 2 * HOUR, end=NOW - HOUR)], None, False,
     "denied", False),
    ("other-org permit for another org", "phys_b", "vitals", [consent("c", orgs=["org-c"])],
     None, False, "denied", False),
    ("other-org nurse with permit still bound by role", "nurse_b", "mental",
     [consent("c", orgs=["org-b"], categories=["mental-health"])], None, False, "denied",
     False),
    ("other-org PSY needs label permit too", "phys_b", "mental", [consent("c", orgs=["org-b"])],
     None, False, "denied", False),
    ("other-org PSY with label permit", "phys_b", "mental",
     [consent("c", orgs=["org-b"], labels=["PSY"])], None, True, "consent:c", False),
    # break the glass
    ("break-glass: physician with reason", "phys", "mental", [], REASON, True, "break-glass",
     True),
    ("break-glass: reason of exactly 10 characters", "phys", "mental", [], "  0123456789 ",
     True, "break-glass", True),
    ("break-glass: overrides a deny", "phys", "vitals",
     [consent("d", "deny", actors=["dr-phys"])], REASON, True, "break-glass", True),
    ("break-glass: other org without consent", "phys_b", "vitals", [], REASON, True,
     "break-glass", True),
    ("break-glass: psychiatrist", "psy", "lab_hiv", [], REASON, True, "break-glass", True),
    ("break-glass: not needed, not flagged", "phys", "vitals", [], REASON, True, "care", False),
    ("break-glass: nurse refused", "nurse", "mental", [], REASON, False, "denied", False),
    ("break-glass: clerk refused", "clerk", "vitals", [], REASON, False, "denied", False),
    ("break-glass: short reason refused", "phys", "mental", [], "emergency", False, "denied",
     False),
    ("break-glass: whitespace padding does not count", "phys", "mental", [], "   urgent!   ",
     False, "denied", False),
    ("break-glass: empty reason refused", "phys", "mental", [], "", False, "denied", False),
]


@pytest.mark.parametrize(
    ("actor", "record", "consents", "reason", "allowed", "basis", "flagged"),
    [row[1:] for row in TABLE], ids=[row[0] for row in TABLE],
)
def test_decide_read(actor: str, record: str, consents: list[dict[str, Any]],
                     reason: str | None, allowed: bool, basis: str, flagged: bool) -> None:
    category, labels = RECORDS[record]
    d = policy.decide_read(state_with(consents), ACTORS[actor], "pat-1", category, labels, NOW,
                           break_glass_reason=reason)
    assert (d.allowed, d.basis, d.break_glass) == (allowed, basis, flagged), d.reason
    assert d.reason


def test_denials_explain_themselves() -> None:
    s = state_with([consent("d7", "deny", actors=["dr-phys"])])
    d = policy.decide_read(s, ACTORS["phys"], "pat-1", "vital-signs", [], NOW)
    assert "d7" in d.reason
    d = policy.decide_read(state_with([]), ACTORS["phys"], "pat-1", "mental-health", ["PSY"], NOW)
    assert "PSY" in d.reason and "consent" in d.reason
    d = policy.decide_read(state_with([]), ACTORS["nurse"], "pat-1", "mental-health", [], NOW)
    assert "nurse" in d.reason and "mental-health" in d.reason
    d = policy.decide_read(state_with([]), ACTORS["phys_b"], "pat-1", "vital-signs", [], NOW)
    assert "org-b" in d.reason
    d = policy.decide_read(state_with([]), ACTORS["nurse"], "pat-1", "mental-health", [], NOW,
                           break_glass_reason=REASON)
    assert "may not break the glass" in d.reason
    d = policy.decide_read(state_with([]), ACTORS["phys"], "pat-1", "mental-health", ["PSY"],
                           NOW, break_glass_reason=REASON)
    assert REASON in d.reason and "overrode" in d.reason


def test_decision_is_a_pure_function_of_state_and_time() -> None:
    s = state_with([consent("c", actors=["dr-phys"], labels=["PSY"], end=NOW + 1)])
    before = dict(s.data)
    first = policy.decide_read(s, ACTORS["phys"], "pat-1", "mental-health", ["PSY"], NOW)
    assert first == policy.decide_read(s, ACTORS["phys"], "pat-1", "mental-health", ["PSY"], NOW)
    assert first.allowed and s.data == before
    assert not policy.decide_read(s, ACTORS["phys"], "pat-1", "mental-health", ["PSY"],
                                  NOW + 1).allowed


@pytest.mark.parametrize(
    ("role", "category", "may"),
    [("nurse", "vital-signs", True), ("nurse", "mental-health", False),
     ("nurse", "demographics", False), ("admin-clerk", "demographics", True),
     ("admin-clerk", "vital-signs", False), ("physician", "mental-health", True),
     ("psychiatrist", "claims", True)],
)
def test_may_write(role: str, category: str, may: bool) -> None:
    assert policy.may_write(policy.ROLES[role], category) is may


def test_writer_role() -> None:
    org = {"id": "org-a", "kind": "org"}
    assert policy.writer_role(org, None) is policy.SYSTEM
    assert policy.writer_role(ACTORS["pat1"], None) is None
    assert policy.writer_role(org, ACTORS["nurse"]) is policy.ROLES["nurse"]
    assert policy.writer_role(org, ACTORS["pat1"]) is None
    assert policy.writer_role(org, ACTORS["surgeon"]) is None


def test_roles_cover_the_documented_categories() -> None:
    nurse = policy.ROLES["nurse"]
    assert {"vital-signs", "medications", "allergies"} <= nurse.read
    assert not nurse.break_glass and "PSY" in policy.ROLES["psychiatrist"].labels
    assert set(policy.SENSITIVE_LABELS) == set(policy.LABEL_NAMES)
    for role in policy.ROLES.values():
        assert role.read == {policy.ALL} or role.read <= set(policy.CATEGORIES)
        assert role.write == {policy.ALL} or role.write <= set(policy.CATEGORIES)
