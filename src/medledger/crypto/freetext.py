"""Sealed free text: AES-256-GCM under a per-node, per-epoch key (ADR 4 section 6).

Free text that travels in ledger txs — break-glass reasons, audit details — is sealed
so members see *that* something happened, not *why*. A node derives one key per
epoch (a UTC day) from its organisation key and wraps it to every member
organisation in its next ``audit.anchor``; each patient's text is sealed under a
sub-key ``HKDF(epoch key, patient id)``, which a node can hand to that patient alone
without revealing anyone else's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.crypto.canonical import b64d, b64e, canonical, loads
from medledger.crypto.kdf import derive_key
from medledger.errors import IntegrityError, InvalidInput


def epoch_of(recorded_iso: str) -> str:
    """The epoch of a timestamp ``2026-12-02T...``: ``20261202``."""
    return recorded_iso[:10].replace("-", "")


def epoch_key(org_secret: bytes, epoch: str) -> bytes:
    return derive_key(org_secret, f"audit free text {epoch}")


def subject_key(epoch_key_: bytes, subject: str | None) -> bytes:
    return derive_key(epoch_key_, f"subject:{subject or ''}")


def seal(key: bytes, aad: Any, doc: dict[str, Any],
         random: Callable[[int], bytes] = os.urandom) -> str:
    iv = random(12)
    return b64e(iv + AESGCM(key).encrypt(iv, canonical(doc), canonical(aad)))


def open_(key: bytes, aad: Any, sealed: str) -> dict[str, Any]:
    raw = b64d(sealed, field="sealed text")
    try:
        doc = loads(AESGCM(key).decrypt(raw[:12], raw[12:], canonical(aad)))
    except (InvalidTag, ValueError, InvalidInput) as exc:
        raise IntegrityError("sealed text failed authentication") from exc
    if not isinstance(doc, dict):
        raise IntegrityError("sealed text is not an object")
    return doc
