"""Building SMART Health Link shares: the ``share.create`` body and the ``shlink:/`` link.

Used by the node (portal sessions) and by the CLI (client-side, with the
patient's own key): the selected resources go into a FHIR collection Bundle,
encrypted as a compact JWE (dir + A256GCM) under a fresh 32-byte key that only
the link carries. The ledger stores the JWE, the expiry, the salted passcode
hash and the attempt budget, so every node honours and revokes it alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from medledger.crypto.canonical import b64e, canonical
from medledger.crypto.keys import passcode_hash
from medledger.errors import InvalidInput
from medledger.fhir import shl

PASSCODE_N = 2**14
MAX_ATTEMPTS = 5


def build_share(patient: str, chosen: list[tuple[dict[str, Any], tuple[str, str, int]]],
                base_url: str, now_iso: str, exp: int | None, passcode: str | None,
                label: str, recipient: str = "",
                random: Callable[[int], bytes] = os.urandom) -> tuple[dict[str, Any], str]:
    """(share.create body, shlink) for ``chosen`` = [(resource, (type, id, version))]."""
    if not chosen:
        raise InvalidInput("the selection matches no records; nothing to share")
    if passcode is not None and len(passcode) < 4:
        raise InvalidInput("a share passcode must be at least 4 characters")
    if len(label) > 80:
        raise InvalidInput("a share label must be at most 80 characters")
    collection = {"resourceType": "Bundle", "type": "collection", "timestamp": now_iso,
                  "entry": [{"fullUrl": f"{base_url}/fhir/{t}/{i}", "resource": r}
                            for r, (t, i, _) in chosen]}
    key = random(32)
    jwe = shl.encrypt_jwe(canonical(collection), key, random(12))
    share_id = random(32).hex()  # 64 chars within core.tx.ID_RE (base64url may hold "_")
    pass_doc = None
    if passcode is not None:
        salt = random(16)
        pass_doc = {"salt": b64e(salt), "n": PASSCODE_N,
                    "hash": b64e(passcode_hash(passcode, salt, PASSCODE_N))}
    body = {"id": share_id, "patient": patient, "exp": exp, "label": label,
            "passcode": pass_doc, "max_attempts": MAX_ATTEMPTS,
            "records": [list(ref) for _, ref in chosen], "jwe": jwe,
            "recipient": recipient[:200]}
    payload = shl.ShlPayload.with_key_bytes(f"{base_url}/shl/{share_id}", key, exp=exp,
                                            flag="P" if passcode else None,
                                            label=label or None)
    return body, shl.encode_shlink(payload)


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
