"""Building SMART Health Link shares: the ``share.create`` body, the payload, the link.

Used by the node (portal sessions) and by the CLI (client-side, with the
patient's own key): the selected resources go into a FHIR collection Bundle,
encrypted as a compact JWE (dir + A256GCM) under a fresh 32-byte key that only
the link carries. The ledger gets the grant — records, expiry, attempt budget, the
issuing node and a commitment to the JWE (its SHA-256) — never the JWE itself, the
passcode or any free text (ADR 4 section 3): the issuing node keeps those and
releases the JWE only through the manifest, after every check.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

from medledger.crypto.canonical import canonical, sha256
from medledger.errors import InvalidInput
from medledger.fhir import shl

MAX_ATTEMPTS = 5
MAX_LABEL = 80  # the SHL spec's label limit
MAX_RECIPIENT = 200


def check_share_text(passcode: str | None, label: str, recipient: str) -> None:
    if passcode is not None and not 4 <= len(passcode) <= 64:
        raise InvalidInput("a share passcode must be 4-64 characters")
    if len(label) > MAX_LABEL:
        raise InvalidInput(f"a share label must be at most {MAX_LABEL} characters")
    if len(recipient) > MAX_RECIPIENT:
        raise InvalidInput(f"a share recipient must be at most {MAX_RECIPIENT} characters")


def build_share(patient: str, chosen: list[tuple[dict[str, Any], tuple[str, str, int]]],
                base_url: str, now_iso: str, exp: int | None, passcode: str | None,
                label: str, node_org: str,
                random: Callable[[int], bytes] = os.urandom) -> tuple[dict[str, Any], str, str]:
    """(share.create body, JWE payload, shlink) for ``chosen`` = [(resource, (type, id, v))]."""
    if not chosen:
        raise InvalidInput("the selection matches no records; nothing to share")
    check_share_text(passcode, label, "")
    collection = {"resourceType": "Bundle", "type": "collection", "timestamp": now_iso,
                  "entry": [{"fullUrl": f"{base_url}/fhir/{t}/{i}", "resource": r}
                            for r, (t, i, _) in chosen]}
    key = random(32)
    jwe = shl.encrypt_jwe(canonical(collection), key, random(12))
    share_id = random(32).hex()  # 64 chars within core.tx.ID_RE (base64url may hold "_")
    body = {"id": share_id, "patient": patient, "exp": exp, "node": node_org,
            "payload": sha256(jwe.encode("ascii")).hex(), "passcode": passcode is not None,
            "max_attempts": MAX_ATTEMPTS, "records": [list(ref) for _, ref in chosen]}
    payload = shl.ShlPayload.with_key_bytes(f"{base_url}/shl/{share_id}", key, exp=exp,
                                            flag="P" if passcode else None,
                                            label=label or None)
    return body, jwe, shl.encode_shlink(payload)


def passcode_verifier(node_key: bytes, share_id: str, passcode: str) -> bytes:
    """What the issuing node keeps instead of a hash: useless without the node key."""
    return hmac.new(node_key, canonical([share_id, passcode]), "sha256").digest()


def select(records: list[tuple[dict[str, Any], dict[str, Any]]], selection: dict[str, Any]
           ) -> list[tuple[dict[str, Any], tuple[str, str, int]]]:
    """Pick (resource, meta) pairs by category, type or "Type/id"; empty selection = all."""
    cats = set(selection.get("categories") or [])
    types = set(selection.get("types") or [])
    ids = set(selection.get("ids") or [])
    out = []
    for resource, meta in records:
        ref = f"{meta['type']}/{meta['id']}"
        if (cats or types or ids) and not (meta["category"] in cats or meta["type"] in types
                                           or ref in ids):
            continue
        out.append((resource, (meta["type"], meta["id"], int(meta["v"]))))
    return out
