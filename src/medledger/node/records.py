"""Sealing and opening record versions: what a ``record.put`` tx carries.

The plaintext sealed per version is ``canonical({"salt", "resource"})``; the
ledger gets the ciphertext, the data key wrapped to each reader, and a salted
commitment ``SHA-256(salt || canonical(resource))`` that a reader re-checks
after decrypting (never a bare hash of PHI, which could be guessed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from medledger.crypto import envelope
from medledger.crypto.canonical import b64d, b64e, canonical, loads, sha256
from medledger.errors import IntegrityError


def record_aad(chain: str, patient: str, rtype: str, rid: str, version: int) -> bytes:
    return canonical([chain, patient, rtype, rid, version])


def seal_record(chain: str, resource: dict[str, Any], patient: str, version: int,
                readers: Mapping[str, bytes],
                random: Callable[[int], bytes] = os.urandom) -> dict[str, Any]:
    """The encrypted part of a ``record.put`` body for ``resource``."""
    rtype, rid = resource["resourceType"], resource["id"]
    salt = random(32)
    res_bytes = canonical(resource)
    plaintext = canonical({"salt": b64e(salt), "resource": resource})
    sealed = envelope.seal(plaintext, record_aad(chain, patient, rtype, rid, version), readers,
                           random)
    return {"ct": b64e(sealed.ciphertext), "iv": b64e(sealed.nonce),
            "keys": {r: b64e(k) for r, k in sealed.wrapped_keys.items()},
            "commitment": b64e(sha256(salt + res_bytes))}


def open_record(chain: str, body: Mapping[str, Any], reader_id: str,
                reader_private: bytes) -> dict[str, Any]:
    """Decrypt a ``record.put`` body as ``reader_id`` and check its commitment."""
    aad = record_aad(chain, body["patient"], body["type"], body["id"], body["version"])
    mine = body["keys"].get(reader_id)
    sealed = envelope.Sealed(b64d(body["ct"], field="ct"), b64d(body["iv"], field="iv"),
                             {} if mine is None else {reader_id: b64d(mine, field="wrapped key")})
    doc = loads(envelope.open_for(sealed, aad, reader_id, reader_private))
    resource = doc["resource"]
    if sha256(b64d(doc["salt"]) + canonical(resource)) != b64d(body["commitment"]):
        raise IntegrityError(f"{body['type']}/{body['id']} version {body['version']}: decrypted "
                             "content does not match its ledger commitment")
    return resource  # type: ignore[no-any-return]


def rewrap_key(body: Mapping[str, Any], reader_id: str, reader_private: bytes,
               new_reader_public: bytes) -> str:
    """The version's data key, unwrapped as ``reader_id`` and wrapped to a new reader."""
    data_key = envelope.unwrap_key(b64d(body["keys"][reader_id], field="wrapped key"),
                                   reader_private)
    return b64e(envelope.wrap_key(data_key, new_reader_public))


def record_body_from_tx(tx_body: Mapping[str, Any], kind: str, op: int | None) -> Mapping[str, Any]:
    """The ``record.put`` body inside a plain or batch tx."""
    if kind == "batch":
        return tx_body["ops"][op]["body"]  # type: ignore[no-any-return]
    return tx_body
