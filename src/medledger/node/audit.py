"""Audit events: made for every read, search, write, consent change, share use and denial.

Events hold ids and codes, never PHI beyond ids. Their free text (the reason,
e.g. a break-glass justification, and the detail) is sealed into ``x`` under this
node's audit key of the day (``crypto.freetext``) before the event is written, so
the bytes in the node's local log, on the ledger and in every node's index are the
same and hold no readable text. They are written to the local log before the
response leaves (``Auditor.record``), then anchored in batches (an
``audit.anchor`` tx), which puts them in every node's copy with a Merkle root per
block. ``open_event`` restores the text for those entitled to it; ``to_fhir``
renders an opened event as a FHIR R4 AuditEvent in the IHE BALP shape.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from medledger.crypto import freetext
from medledger.crypto.canonical import canonical, loads
from medledger.storage.sqlite import SqliteStore

FREE_TEXT = ("reason", "detail")

ACTIONS = {"create": "C", "update": "U", "read": "R", "vread": "R", "history": "R",
           "search": "E", "everything": "E", "consent": "C", "consent-revoke": "U",
           "share-create": "C", "share-revoke": "U", "share-access": "R", "export": "R",
           "audit-read": "R", "consent-read": "R", "match": "E", "summary": "R",
           "register": "C", "transaction": "C", "erase": "D", "disclosures": "R",
           "activation-code": "C", "activate": "U", "recovery-setup": "C",
           "recovery-request": "C", "recovery-approve": "U", "recovery-complete": "U",
           "recovery-cancel": "U"}
SUBTYPES = {"create": "create", "update": "update", "read": "read", "vread": "vread",
            "history": "history-instance", "search": "search-type", "everything": "operation",
            "transaction": "transaction"}


def iso_now(clock: Callable[[], float] = time.time) -> str:
    """``clock()`` as UTC ISO 8601 with microseconds, exactly as ``datetime.fromtimestamp``
    rounds it (half to even); the date and time of day are formatted once per second (a
    large import stamps ~35,000 resources with ``lastUpdated``)."""
    frac, whole = math.modf(clock())
    second, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    elif us < 0:
        second, us = second - 1, us + 1_000_000
    return f"{_iso_second(second)}.{us:06d}Z"


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _aad(ev: dict[str, Any]) -> list[Any]:
    return [ev["id"], ev.get("node"), ev.get("patient")]


def seal_event(ev: dict[str, Any], org_secret: bytes) -> dict[str, Any]:
    """The ledger form of an event: reason and detail sealed into ``x`` (epoch ``k``)."""
    text = {f: ev[f] for f in FREE_TEXT if ev.get(f)}
    out = {k: v for k, v in ev.items() if k not in FREE_TEXT}
    if text:
        epoch = freetext.epoch_of(ev["recorded"])
        key = freetext.subject_key(freetext.epoch_key(org_secret, epoch), ev.get("patient"))
        out.update(x=freetext.seal(key, _aad(ev), text), k=epoch)
    return out


def open_event(ev: dict[str, Any], epoch_key: Callable[[str, str], bytes | None]
               ) -> dict[str, Any]:
    """An event with its free text restored (``epoch_key(node, epoch)`` gives the node's
    key of that epoch, or None when this reader has none: the text stays withheld)."""
    out = {k: v for k, v in ev.items() if k not in ("x", "k")}
    out.update(reason="", detail="")
    if ev.get("x"):
        key = epoch_key(str(ev.get("node")), str(ev.get("k")))
        if key is None:
            out["detail"] = "(free text sealed to the member organisations)"
        else:
            out.update(freetext.open_(freetext.subject_key(key, ev.get("patient")),
                                      _aad(ev), ev["x"]))
    return out


class Auditor:
    def __init__(self, store: SqliteStore, node_org: str,
                 clock: Callable[[], float] = time.time, org_secret: bytes = b"") -> None:
        self.store = store
        self.node_org = node_org
        self.clock = clock
        self.org_secret = org_secret
        self.deferred = False
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # searches record events from worker threads
        self._recorded = 0  # events recorded (deferred mode)
        self._durable = 0  # of which durable: every event up to this count is committed
        self._scheduled: asyncio.Future[None] | None = None  # a commit not yet started
        self._writer: ThreadPoolExecutor | None = None

    def event(self, subtype: str, *, agent: str, agent_org: str, agent_role: str | None,
              patient: str | None, entity: list[str], outcome: str = "0",
              purpose: str = "TREAT", reason: str = "", basis: str = "",
              break_glass: bool = False, detail: str = "") -> dict[str, Any]:
        ev: dict[str, Any] = {
            "id": str(uuid.uuid4()), "recorded": iso_now(self.clock),
            "action": ACTIONS.get(subtype, "E"), "subtype": subtype, "outcome": outcome,
            "agent": agent, "agent_org": agent_org, "agent_role": agent_role or "",
            "patient": patient, "entity": entity[:50], "purpose": purpose,
            "reason": reason[:500], "node": self.node_org, "basis": basis,
            "break_glass": break_glass, "detail": detail[:500]}
        return ev

    def record(self, *events: dict[str, Any]) -> None:
        """Make events durable before the caller answers.

        Immediate by default (one SQLite commit here). Under the HTTP API the node
        runs *deferred*: events are buffered and ``flush`` makes them durable just before
        a response starts: the sealing and the commit run on one audit writer thread,
        one transaction for everything buffered meanwhile (group commit), while the event
        loop serves other requests.
        """
        if self.deferred:
            with self._lock:
                self._buffer.extend(events)
                self._recorded += len(events)
        else:
            self.store.append_local_audit(self._rows(events))

    def _rows(self, events: Iterable[dict[str, Any]]) -> list[tuple[str, str | None, bytes]]:
        return [(e["id"], e.get("patient"), canonical(seal_event(e, self.org_secret)))
                for e in events]

    async def flush(self) -> None:
        """Return once every event recorded before the call is durable; raise if the
        commit that should have made them so failed (the caller then refuses to answer).
        Commits run in order on the writer thread, so waiting for a commit scheduled
        now covers everything recorded so far."""
        with self._lock:
            target = self._recorded
        while self._durable < target:
            with self._lock:
                fut = self._scheduled
                if fut is None:
                    if self._writer is None:
                        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit")
                    fut = self._scheduled = asyncio.get_running_loop().run_in_executor(
                        self._writer, self._commit_buffered)
            await asyncio.shield(fut)

    def _commit_buffered(self) -> None:
        """On the writer thread: take everything buffered and commit it in one
        transaction. On failure the events go back to the buffer (the next commit
        retries them) and every waiter of this commit gets the error."""
        with self._lock:
            events, self._buffer, self._scheduled = self._buffer, [], None
            upto = self._recorded
        if not events:
            self._durable = max(self._durable, upto)
            return
        try:
            self.store.append_local_audit(self._rows(events))
        except Exception:
            with self._lock:
                self._buffer[:0] = events
            raise
        self._durable = max(self._durable, upto)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def pending(self, limit: int = 1000) -> list[dict[str, Any]]:
        return [loads(e) for e in self.store.pending_local_audit(limit)]


def to_fhir(ev: dict[str, Any], anchored_height: int | None = None) -> dict[str, Any]:
    """Render an event as a FHIR R4 AuditEvent (IHE Basic Audit Log Patterns shape)."""
    subtype = ev.get("subtype", "")
    rest = SUBTYPES.get(subtype)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": ev["id"],
        "type": ({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                  "code": "rest", "display": "RESTful Operation"} if rest else
                 {"system": "http://medledger.example/audit-event-type", "code": subtype}),
        "action": ev["action"],
        "recorded": ev["recorded"],
        "outcome": ev.get("outcome", "0"),
        "agent": [
            {"type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                  "code": "110153", "display": "Source Role ID"}]},
             "who": {"reference": _who(ev["agent"], ev.get("agent_role", "")),
                     "display": ev.get("agent_role") or ev["agent"]},
             "requestor": True,
             "role": [{"text": ev.get("agent_role") or "user"}]},
            {"who": {"reference": f"Organization/{ev.get('agent_org', '')}"},
             "requestor": False},
        ],
        "source": {"observer": {"reference": f"Organization/{ev.get('node', '')}"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                       "security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": [],
    }
    if rest:
        resource["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction",
                                "code": rest}]
    purpose = ev.get("purpose")
    if purpose:
        resource["purposeOfEvent"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}]}]
    if ev.get("outcome") not in (None, "0") and ev.get("reason"):
        resource["outcomeDesc"] = ev["reason"]
    if ev.get("patient"):
        resource["entity"].append({
            "what": {"reference": f"Patient/{ev['patient']}"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "1", "display": "Patient"}})
    for ref in ev.get("entity", []):
        resource["entity"].append({
            "what": {"reference": ref},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "4", "display": "Domain Resource"}})
    ext = []
    if ev.get("basis"):  # FHIR strings may not be empty
        ext.append({"url": "http://medledger.example/fhir/StructureDefinition/access-basis",
                    "valueString": ev["basis"]})
    if ev.get("break_glass"):
        ext.append({"url": "http://medledger.example/fhir/StructureDefinition/break-glass",
                    "valueBoolean": True})
        resource["agent"][0]["purposeOfUse"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT"}]}]
    if ev.get("reason"):
        ext.append({"url": "http://medledger.example/fhir/StructureDefinition/access-reason",
                    "valueString": ev["reason"]})
    if ev.get("detail"):
        ext.append({"url": "http://medledger.example/fhir/StructureDefinition/detail",
                    "valueString": ev["detail"]})
    if anchored_height is not None:
        ext.append({"url": "http://medledger.example/fhir/StructureDefinition/anchored-height",
                    "valueInteger": anchored_height})
    if ext:
        resource["extension"] = ext
    if not resource["entity"]:
        del resource["entity"]
    return resource


def _who(agent: str, role: str) -> str:
    if role in ("patient",):
        return f"Patient/{agent}"
    if role in ("", "system"):
        return f"Organization/{agent}"
    return f"Practitioner/{agent}"
