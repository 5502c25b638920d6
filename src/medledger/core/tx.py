"""Signed transactions: wire format, canonical bytes, hashing and shape checks.

Wire format (canonical JSON, see ``crypto.canonical``)::

    {"body": {...}, "chain": "<chain id>", "kind": "<kind>", "nonce": "<hex>",
     "sig": "<b64url Ed25519 signature>", "signer": "<actor id>", "v": 1}

The signature covers the canonical encoding of every field but ``sig``. The
chain id inside the signed bytes stops a tx from being replayed on another
chain; the per-signer nonce stops it from being replayed on this one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medledger.crypto.canonical import b64d, b64e, canonical, loads, sha256
from medledger.crypto.signing import Signer
from medledger.errors import InvalidInput, TooLarge

TX_VERSION = 1
# = CometBFT's mempool.max_tx_bytes (docs/NETWORK.md); bigger imports are staged (ADR 4)
MAX_TX_BYTES = 1024 * 1024
# \Z, not $: "$" also matches before a trailing newline, which would admit "alice\n".
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}\Z")
NONCE_RE = re.compile(r"^[0-9a-f]{16,64}\Z")

KINDS = frozenset({
    "org.propose", "org.approve", "org.nodes",
    "actor.register", "actor.deactivate", "key.rotate",
    "record.put", "record.erase",
    "consent.put", "consent.revoke",
    "share.create", "share.revoke", "share.attempt",
    "audit.anchor",
    "record.rewrap",
    "batch",
    "import.begin", "import.part", "import.commit", "import.abort",
    "recovery.setup", "recovery.revoke", "recovery.request", "recovery.approve",
    "recovery.complete", "recovery.cancel",
})
_FIELDS = frozenset({"body", "chain", "kind", "nonce", "sig", "signer", "v"})


@dataclass(frozen=True)
class Tx:
    chain: str
    kind: str
    signer: str
    nonce: str
    body: Mapping[str, Any]
    sig: bytes
    raw: bytes
    hash: bytes

    @functools.cached_property
    def signing_bytes(self) -> bytes:
        return signing_bytes(self.chain, self.kind, self.signer, self.nonce, self.body)

    @property
    def hash_hex(self) -> str:
        return self.hash.hex()


def signing_bytes(chain: str, kind: str, signer: str, nonce: str, body: Mapping[str, Any]) -> bytes:
    return canonical({"body": body, "chain": chain, "kind": kind, "nonce": nonce,
                      "signer": signer, "v": TX_VERSION})


def make_tx(signer_id: str, signer: Signer, chain: str, kind: str, body: Mapping[str, Any],
            nonce: str) -> Tx:
    """Build and sign a tx. ``nonce`` is hex (callers draw it from their entropy source)."""
    msg = signing_bytes(chain, kind, signer_id, nonce, body)
    sig = signer.sign(msg)
    doc = {"body": body, "chain": chain, "kind": kind, "nonce": nonce, "sig": b64e(sig),
           "signer": signer_id, "v": TX_VERSION}
    raw = canonical(doc)
    return Tx(chain, kind, signer_id, nonce, body, sig, raw, sha256(raw))


def decode_tx(raw: bytes) -> Tx:
    """Parse and shape-check a tx (signature is checked by the machine, against state)."""
    if len(raw) > MAX_TX_BYTES:
        raise TooLarge(f"transaction of {len(raw)} bytes exceeds the {MAX_TX_BYTES}-byte limit")
    doc = loads(raw)
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise InvalidInput("transaction must be an object with exactly the fields "
                           + ", ".join(sorted(_FIELDS)))
    if type(doc["v"]) is not int or doc["v"] != TX_VERSION:  # true == 1.0 == 1 in Python
        raise InvalidInput(f"unsupported transaction version {doc['v']!r}")
    kind, signer, nonce, chain, body = (doc["kind"], doc["signer"], doc["nonce"], doc["chain"],
                                        doc["body"])
    if not isinstance(kind, str) or kind not in KINDS:  # a list kind is unhashable
        raise InvalidInput(f"unknown transaction kind {kind!r}")
    if not isinstance(signer, str) or not ID_RE.match(signer):
        raise InvalidInput("transaction signer must be an id of 1-64 [A-Za-z0-9-.]")
    if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
        raise InvalidInput("transaction nonce must be 16-64 lowercase hex digits")
    if not isinstance(chain, str) or not chain:
        raise InvalidInput("transaction chain id must be a non-empty string")
    if not isinstance(body, dict):
        raise InvalidInput("transaction body must be an object")
    if canonical(doc) != raw:
        raise InvalidInput("transaction is not canonically encoded")
    sig = b64d(doc["sig"], field="sig", size=64)
    return Tx(chain, kind, signer, nonce, body, sig, raw, sha256(raw))
