"""Node-local tamper evidence: a key only the organisation can derive, MACs and a hash chain.

What a node keeps outside consensus (its not-yet-anchored audit log, the newest block
it committed) cannot be checked against other nodes; it is sealed with an HMAC under a
key derived (HKDF-SHA256) from the organisation's private signing seed, so whoever
can write the database but does not hold the unlocked org keystore cannot delete,
edit or roll back those entries without the node noticing at its next start.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medledger.crypto.canonical import canonical

_INFO = b"medledger local seal v1"
GENESIS_LINK = b"\x00" * 32


def derive_seal_key(org_secret: bytes, chain: str) -> bytes:
    """32-byte MAC key from the organisation's private seed, bound to the chain id."""
    return HKDF(hashes.SHA256(), 32, salt=chain.encode(), info=_INFO).derive(org_secret)


def mac(key: bytes, *parts: object) -> str:
    """Hex HMAC-SHA256 over the canonical encoding of ``parts``."""
    return hmac.new(key, canonical(list(parts)), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, tag: str, *parts: object) -> bool:
    return hmac.compare_digest(mac(key, *parts), tag)


def chain_link(prev: bytes, seq: int, event: bytes) -> bytes:
    """Hash of one local audit row, chained to the previous row's hash."""
    return hashlib.sha256(prev + seq.to_bytes(8, "big") + hashlib.sha256(event).digest()).digest()
