"""Keys a node derives from its organisation's secret key, one per purpose (HKDF-SHA256).

A node needs a few secrets of its own that no one else holds: the passcode verifier
key of the share links it issues, the key of its encrypted search index, the key that
seals node-local free text, the audit free-text key of each epoch. Each is derived
with HKDF from the organisation's X25519 private key and a distinct ``info`` label,
so rotating the organisation key rotates them all and none reveals another.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"medledger node keys v1"


def derive_key(secret: bytes, info: str, length: int = 32) -> bytes:
    """A ``length``-byte key for ``info`` (e.g. "search index v1") from ``secret``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT,
                info=info.encode("utf-8")).derive(secret)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` (e.g. the search paging cursors a node issues)."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()
