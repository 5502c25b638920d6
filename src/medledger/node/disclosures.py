"""Accounting of disclosures (HIPAA 45 CFR 164.528): what left the patient's own care.

From the patient's audit trail (anchored events, every node's copy) this module picks
the *disclosures*: accesses that are not treatment by an organisation caring for the
patient and not the patient's own -

- ``other-organisation``: a read, search or export by staff of an organisation with no
  care relationship (a consent let it in);
- ``share-link``: a SMART Health Link opened by its recipient;
- ``break-glass``: emergency access, whoever did it;
- ``export``: a copy of the record made by anyone but the patient.

Each comes with its ledger inclusion proof (``core.proofs``: the sealed event is a leaf
of its block's audit root) and the *subject key* that opens the event's sealed free
text - the per-patient sub-key of that node's epoch key (``crypto.freetext``), which
opens this patient's text and nobody else's - so the patient can check every line
without trusting the node that listed it (``medledger audit prove``). ``render_pdf``
prints the accounting (fpdf2).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medledger.core import proofs
from medledger.core import state as st
from medledger.crypto import freetext
from medledger.crypto.canonical import b64e, canonical, loads
from medledger.errors import InvalidInput
from medledger.node import audit as audit_mod
from medledger.node.auth import Session

if TYPE_CHECKING:
    from medledger.node.service import Node

LOOKBACK_S = 6 * 365 * 86400  # 164.528(a): six years before the request
MAX_EVENTS = 100_000
READS = frozenset({"read", "vread", "history", "search", "everything", "summary", "match",
                   "export"})
KIND_NAMES = {"other-organisation": "read by another organisation",
              "share-link": "share link opened", "break-glass": "emergency access",
              "export": "export"}
PURPOSES = {"TREAT": "treatment", "ETREAT": "emergency treatment",
            "PATRQT": "at the patient's request"}
EXT = "http://medledger.example/fhir/StructureDefinition/"


def kind_of(ev: dict[str, Any], patient: str, caring: set[str]) -> str | None:
    """The kind of disclosure an event is, or None (treatment, the patient, refusals)."""
    if ev.get("outcome") != "0" or ev.get("agent") == patient:
        return None
    if ev.get("break_glass"):
        return "break-glass"
    subtype = ev.get("subtype")
    if subtype == "share-access":
        return "share-link"
    if subtype == "export":
        return "export"
    if subtype in READS and ev.get("agent_org") not in caring:
        return "other-organisation"
    return None


def _instant(value: str, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"{what} must be a date like 2026-01-31, got {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if len(value) == 10 and what == "end":  # a date: the whole day counts
        parsed += timedelta(days=1)
    return parsed.astimezone(UTC)


def parse_period(start: str | None, end: str | None, now_s: int) -> tuple[str, str]:
    """ISO bounds ``[start, end)`` from dates (``YYYY-MM-DD``, ``end`` inclusive) or
    instants; default: six years back (164.528) up to now."""
    lo = _instant(start, "start") if start else datetime.fromtimestamp(now_s - LOOKBACK_S, UTC)
    hi = _instant(end, "end") if end else datetime.fromtimestamp(now_s + 1, UTC)
    if hi <= lo:
        raise InvalidInput("the period ends before it starts")
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"  # the audit events' own format: compared as strings
    return lo.strftime(fmt), hi.strftime(fmt)


def disclosures(node: Node, session: Session, patient: str, start: str | None = None,
                end: str | None = None) -> list[dict[str, Any]]:
    """The patient's disclosures in ``[start, end)``, oldest first, each with its proof."""
    if not (session.kind == "patient" and session.actor_id == patient) and not (
            session.kind == "org" and session.actor_id == node.org.id
            and st.has_care(node.store, patient, node.org.id)):
        raise node._deny(session, "disclosures", patient, [],
                         "only the patient, or an organisation caring for them, may see their "
                         "accounting of disclosures")
    lo, hi = parse_period(start, end, node.now_s)
    caring = {key.rsplit("/", 1)[1] for key, _ in node.store.scan(f"care/{patient}/")}
    rows = node.store.audit_for_patient(patient, lo, MAX_EVENTS)
    leaves: dict[int, list[bytes]] = {}
    out = []
    for raw, height in reversed(rows):
        ev = loads(raw)
        kind = kind_of(ev, patient, caring)
        if kind is None or ev["recorded"] >= hi:
            continue
        out.append(_entry(node, patient, ev, kind, height, leaves))
    node._audit(session, "disclosures", patient, [],
                detail=f"accounting of {len(out)} disclosures {lo[:10]}..{hi[:10]}")
    return out


def _entry(node: Node, patient: str, sealed: dict[str, Any], kind: str, height: int | None,
           leaves: dict[int, list[bytes]]) -> dict[str, Any]:
    ev = node.open_event(sealed)
    proof = None
    if height is not None:
        found = node.store.audit_event(sealed["id"])
        header = node.store.block(found[0]) if found else None
        if found is not None and header is not None:
            if found[0] not in leaves:
                leaves[found[0]] = node.store.audit_leaves(found[0])
            proof = proofs.make_proof("audit", header, leaves[found[0]], found[1])
    key = None
    if sealed.get("x"):
        epoch_key = node._epoch_key(str(sealed.get("node")), str(sealed.get("k")))
        key = None if epoch_key is None else b64e(freetext.subject_key(epoch_key, patient))
    recipient = ev["detail"] if kind == "share-link" and ev.get("detail") else ev["agent"]
    return {"id": ev["id"], "date": ev["recorded"], "kind": kind, "recipient": recipient,
            "recipient_org": ev.get("agent_org", ""), "role": ev.get("agent_role", ""),
            "what": ev.get("entity", []), "purpose": ev.get("purpose", ""),
            "reason": ev.get("reason", ""), "detail": ev.get("detail", ""),
            "node": ev.get("node"), "anchored_height": height, "event": ev,
            "proof": proof, "subject_key": key}


def to_bundle(entries: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    """A FHIR Bundle of AuditEvents; each carries its disclosure kind, its inclusion proof
    (an Attachment of the proof JSON) and the key of its sealed free text."""
    out = []
    for e in entries:
        resource = audit_mod.to_fhir(e["event"], e["anchored_height"])
        ext = resource.setdefault("extension", [])
        ext.append({"url": EXT + "disclosure-kind", "valueCode": e["kind"]})
        if e["proof"] is not None:
            ext.append({"url": EXT + "ledger-proof", "valueAttachment": {
                "contentType": "application/json",
                "data": base64.b64encode(canonical(e["proof"])).decode("ascii")}})
        if e["subject_key"]:
            ext.append({"url": EXT + "sealed-text-key",
                        "valueBase64Binary": _std_b64(e["subject_key"])})
        out.append({"fullUrl": f"{base_url}/AuditEvent/{e['id']}", "resource": resource})
    return {"resourceType": "Bundle", "type": "collection", "total": len(out), "entry": out}


def _std_b64(urlsafe: str) -> str:
    raw = base64.urlsafe_b64decode(urlsafe + "=" * (-len(urlsafe) % 4))
    return base64.b64encode(raw).decode("ascii")


# ------------------------------------------------------------------ printable copy

# DejaVu Sans (Latin, Greek, Cyrillic, Hebrew, Arabic, ...; its licence is beside it):
# names in any of those scripts print as written, not as "?"
FONTS = Path(__file__).parent / "fonts"


def render_pdf(entries: list[dict[str, Any]], patient: str, period: tuple[str, str],
               org: str, generated: str) -> bytes:
    """The accounting as a printable PDF (A4 landscape)."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(orientation="L", format="A4")
    pdf.set_title(f"Accounting of disclosures - {patient}")
    pdf.set_creator("medledger")
    pdf.add_font("dejavu", "", str(FONTS / "DejaVuSans.ttf"))
    pdf.add_font("dejavu", "B", str(FONTS / "DejaVuSans-Bold.ttf"))
    pdf.add_page()
    pdf.set_font("dejavu", "B", 15)
    pdf.cell(0, 9, "Accounting of disclosures of your health record",
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("dejavu", size=9)
    lines = [f"Patient: {patient}    Provided by: {org}    Generated: {generated[:19]} UTC",
             f"Period: {period[0][:19].replace('T', ' ')} up to {period[1][:19].replace('T', ' ')}"
             " UTC (45 CFR 164.528: disclosures "
             "other than for treatment by your own care providers)",
             f"{len(entries)} disclosures. Every entry is an audit event anchored on the "
             "ledger; check each with `medledger audit prove`."]
    for line in lines:
        pdf.cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    headings = ("Date (UTC)", "Recipient", "What", "Purpose / reason", "Kind", "Block")
    with pdf.table(col_widths=(32, 55, 70, 70, 35, 15), line_height=4.5,
                   headings_style=FontFace(emphasis="BOLD", fill_color=(225, 232, 240)),
                   text_align="LEFT") as table:
        row = table.row()
        for h in headings:
            row.cell(h)
        for e in entries:
            what = ", ".join(e["what"][:6]) + (" ..." if len(e["what"]) > 6 else "")
            why = " - ".join(x for x in (PURPOSES.get(e["purpose"], e["purpose"]),
                                         e["reason"]) if x)
            who = e["recipient"] + (f" ({e['role']}, {e['recipient_org']})"
                                    if e["recipient_org"] not in ("", "external") else "")
            row = table.row()
            for value in (e["date"][:19].replace("T", " "), who, what or "-", why or "-",
                          KIND_NAMES.get(e["kind"], e["kind"]),
                          e["anchored_height"] if e["anchored_height"] else "pending"):
                row.cell(str(value))
    if not entries:
        pdf.ln(2)
        pdf.cell(0, 6, "No disclosures in this period.", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
