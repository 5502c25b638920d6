"""Client-side checks of audit-event inclusion proofs (``medledger audit prove``).

Given what a node handed out - an accounting of disclosures (a FHIR Bundle whose
AuditEvents carry ``ledger-proof`` and ``sealed-text-key`` extensions) or a single proof
document - check without trusting that node: each proof's Merkle path against its
block header (``core.proofs.verify_proof``), that the event the node *shows* is the
leaf that was anchored, that the sealed free text opens with the key given, and
optionally that other member nodes serve the same block header.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from medledger.client import Client
from medledger.core import proofs
from medledger.core.machine import header_hash
from medledger.crypto import freetext
from medledger.crypto.canonical import b64d, loads
from medledger.crypto.keys import Identity
from medledger.errors import InvalidInput, MedledgerError

EXT = "http://medledger.example/fhir/StructureDefinition/"


@dataclass(frozen=True)
class Checked:
    event_id: str
    recorded: str
    height: int | None
    proof_ok: bool
    text: str  # what the sealed free text said, or why it could not be read
    against: str  # "" / "same header at N nodes" / "DIFFERENT at ..."
    text_ok: bool = True
    against_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.proof_ok and self.text_ok and self.against_ok


def _items(doc: Any) -> list[tuple[dict[str, Any], str | None, dict[str, Any] | None]]:
    """(proof, subject key, shown AuditEvent) from a Bundle or one proof document."""
    if isinstance(doc, dict) and doc.get("kind") == "audit":
        return [(doc, None, None)]
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise InvalidInput("expected a disclosures Bundle or an audit proof document")
    out = []
    for entry in doc.get("entry", []):
        r = entry.get("resource", {})
        ext = {x.get("url", "").removeprefix(EXT): x for x in r.get("extension", [])}
        att = ext.get("ledger-proof", {}).get("valueAttachment")
        proof = loads(base64.b64decode(att["data"])) if att else {"id": r.get("id")}
        key = ext.get("sealed-text-key", {}).get("valueBase64Binary")
        out.append((proof, key, r))
    return out


def check_proof(proof: dict[str, Any], key_b64: str | None, shown: dict[str, Any] | None,
                against: list[str], identity: Identity | None = None) -> Checked:
    if "leaf" not in proof:
        return Checked(str(proof.get("id", "?")), "", None, False, "not anchored yet", "",
                       False)
    ok = proofs.verify_proof(proof)
    ev = loads(b64d(proof["leaf"], field="leaf"))
    height = int(proof["header"]["height"])
    if shown is not None and (shown.get("id") != ev.get("id")
                              or shown.get("recorded") != ev.get("recorded")):
        ok = False  # the node showed another event than the one it proved
    text, text_ok = "(none)", True
    if ev.get("x"):
        if key_b64 is None:
            text, text_ok = "sealed (no key given)", True
        else:
            try:
                opened = freetext.open_(base64.b64decode(key_b64),
                                        [ev["id"], ev.get("node"), ev.get("patient")], ev["x"])
                text = "; ".join(str(v) for v in opened.values() if v) or "(empty)"
            except MedledgerError:
                text, text_ok = "DOES NOT OPEN with the key given", False
    where, against_ok = _against(proof, against, identity)
    return Checked(str(ev["id"]), str(ev.get("recorded", "")), height, ok, text, where,
                   text_ok, against_ok)


def _header_at(url: str, height: int, identity: Identity | None) -> dict[str, Any]:
    """A block header from another node: the ledger is for signed-in users (members get
    blocks, anyone else their headers), so the patient signs in with their own key."""
    if identity is None:
        resp = httpx.get(f"{url.rstrip('/')}/ledger/blocks/{height}", timeout=10)
        if resp.status_code == 401:
            raise PermissionError("sign in with --key to read block headers there")
        return resp.json()["header"]  # type: ignore[no-any-return]
    with Client(url, identity, timeout=10) as c:
        return c.get(f"/ledger/blocks/{height}")["header"]  # type: ignore[no-any-return]


def _against(proof: dict[str, Any], urls: list[str],
             identity: Identity | None = None) -> tuple[str, bool]:
    if not urls:
        return "", True
    height, expected = proof["header"]["height"], proof["header_hash"]
    same, differ = 0, []
    for url in urls:
        try:
            header = _header_at(url, height, identity)
        except PermissionError as exc:
            differ.append(f"{url} ({exc})")
            continue
        except (httpx.HTTPError, MedledgerError, ValueError, KeyError, TypeError):
            differ.append(f"{url} (unreachable)")
            continue
        if header_hash(header).hex() == expected:
            same += 1
        else:
            differ.append(url)
    if differ:
        return f"DIFFERENT at {', '.join(differ)}", False
    return f"same header at {same} nodes", True


def check_file(path: Path, against: list[str],
               identity: Identity | None = None) -> list[Checked]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    return [check_proof(p, k, r, against, identity) for p, k, r in _items(doc)]
