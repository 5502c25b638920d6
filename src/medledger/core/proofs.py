"""Inclusion proofs for txs and audit events, checkable offline with nothing but this module.

A proof document names the leaf (base64url raw bytes), its index, the tree size,
the audit path, and the block header whose ``tx_root`` or ``audit_root`` it
proves against. ``verify_proof`` recomputes the path and the header hash; a
verifier who trusts a header hash (e.g. from another node) passes it in.
"""

from __future__ import annotations

from typing import Any

from medledger.core.machine import header_hash
from medledger.crypto import merkle
from medledger.crypto.canonical import b64d, b64e
from medledger.errors import InvalidInput


def make_proof(kind: str, header: dict[str, Any], leaves: list[bytes], index: int
               ) -> dict[str, Any]:
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    return {"kind": kind, "leaf": b64e(leaves[index]), "index": index,
            "tree_size": len(leaves),
            "path": [p.hex() for p in merkle.inclusion_proof(hashes, index)],
            "header": header, "header_hash": header_hash(header).hex()}


def verify_proof(doc: dict[str, Any], trusted_header_hash: str | None = None) -> bool:
    """True if the leaf is in the header's tree and the header hashes as claimed."""
    try:
        header = doc["header"]
        root_field, size_field = {"tx": ("tx_root", "n_txs"),
                                  "audit": ("audit_root", "n_audit")}[doc["kind"]]
        # The header fixes the tree size; RFC 9162 verification alone does not (a path
        # for leaf 4 of 5 also verifies as "leaf 2 of 3"), so a claimed position is bound here.
        if int(doc["tree_size"]) != header[size_field]:
            return False
        ok = merkle.verify_inclusion(b64d(doc["leaf"]), int(doc["index"]), int(doc["tree_size"]),
                                     [bytes.fromhex(p) for p in doc["path"]],
                                     bytes.fromhex(header[root_field]))
        hh = header_hash(header).hex()
    except (KeyError, ValueError, TypeError, InvalidInput):  # InvalidInput: bad b64/JSON
        return False
    if hh != doc.get("header_hash"):
        return False
    if trusted_header_hash is not None and hh != trusted_header_hash:
        return False
    return ok
