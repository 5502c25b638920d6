"""Sealing and opening record versions: the sealed blob and what the ledger commits to.

A version's plaintext ``canonical({"salt", "resource"})`` is zlib-compressed (by ISA-L's
``isal_zlib``: the zlib format at ~3x the speed of the standard library's level 1) and
sealed with AES-256-GCM under a fresh data key (AAD binds chain, patient, type, id,
version); the data key is wrapped to each reader (a sealed box, or the batch format
when many versions are sealed together: ``crypto.envelope.BatchWrapper``). The
**sealed blob** ``canonical({"ct", "iv", "keys"})`` stays off-chain in the blob stores of
member nodes (ADR 4); the ``record.put`` tx carries its SHA-256, its size, the readers,
and the salted commitment ``SHA-256(salt || canonical(resource))`` that a reader re-checks after
decrypting (never a bare hash of PHI, which could be guessed).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from isal import isal_zlib

from medledger.crypto import envelope
from medledger.crypto.canonical import b64d, b64e, canonical, loads, sha256
from medledger.errors import Forbidden, IntegrityError, InvalidInput
from medledger.storage.blobs import blob_hash

MAX_PLAINTEXT_BYTES = 256 * 1024 * 1024  # a decompression bomb stops here
COMPRESSION_LEVEL = 1  # ISA-L level 1: FHIR JSON shrinks as with zlib's level 1 (Synthea
# resources ~2.3-2.7x), at ~150 MB/s instead of ~55 (12.5 vs 33-37 us each)


def record_aad(chain: str, patient: str | None, rtype: str, rid: str, version: int) -> bytes:
    return canonical([chain, patient, rtype, rid, version])


def seal_record(chain: str, resource: dict[str, Any], patient: str | None, version: int,
                readers: Mapping[str, bytes],
                random: Callable[[int], bytes] = os.urandom,
                wrapper: envelope.BatchWrapper | None = None) -> tuple[dict[str, Any], bytes]:
    """(the ``record.put`` fields that commit to it, the sealed blob) for ``resource``;
    its data key wrapped by ``wrapper`` when it is sealed in a batch."""
    rtype, rid = resource["resourceType"], resource["id"]
    salt = random(32)
    plaintext = isal_zlib.compress(canonical({"salt": b64e(salt), "resource": resource}),
                                   COMPRESSION_LEVEL)
    sealed = envelope.seal(plaintext, record_aad(chain, patient, rtype, rid, version), readers,
                           random, wrapper)
    blob = canonical({"ct": b64e(sealed.ciphertext), "iv": b64e(sealed.nonce),
                      "keys": {r: b64e(k) for r, k in sealed.wrapped_keys.items()}})
    fields = {"commitment": b64e(sha256(salt + canonical(resource))), "blob": blob_hash(blob),
              "size": len(blob), "readers": sorted(readers)}
    return fields, blob


def blob_readers(blob: bytes) -> list[str]:
    """The reader ids a sealed blob's data key is wrapped to (checked against the tx)."""
    return sorted(_parse_blob(blob)["keys"])


def _parse_blob(blob: bytes) -> dict[str, Any]:
    try:
        doc = loads(blob)
    except InvalidInput as exc:
        raise IntegrityError(f"sealed blob is not readable: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"ct", "iv", "keys"} or not isinstance(
            doc["keys"], dict):
        raise IntegrityError("sealed blob must hold exactly ct, iv and keys")
    return doc


def wrapped_key(blob: bytes, reader_id: str) -> bytes | None:
    mine = _parse_blob(blob)["keys"].get(reader_id)
    return None if mine is None else b64d(mine, field="wrapped key")


def open_blob(chain: str, meta: Mapping[str, Any], blob: bytes, reader_private: bytes,
              wrapped: bytes) -> dict[str, Any]:
    """Decrypt a version's sealed blob with ``wrapped`` (the data key as wrapped to this
    reader) and check it against the ledger metadata (blob hash, AAD, commitment)."""
    ref = f"{meta['type']}/{meta['id']} version {meta['v']}"
    if blob_hash(blob) != meta["blob"]:
        raise IntegrityError(f"{ref}: sealed blob does not match the hash on the ledger")
    doc = _parse_blob(blob)
    aad = record_aad(chain, meta["patient"], meta["type"], meta["id"], meta["v"])
    data_key = envelope.unwrap_key(wrapped, reader_private)
    packed = envelope.open_sealed(b64d(doc["ct"], field="ct"), b64d(doc["iv"], field="iv"),
                                  aad, data_key)
    inflater = zlib.decompressobj()
    try:
        plaintext = inflater.decompress(packed, MAX_PLAINTEXT_BYTES)
    except zlib.error as exc:
        raise IntegrityError(f"{ref}: sealed content does not decompress") from exc
    if inflater.unconsumed_tail:
        raise IntegrityError(f"{ref}: sealed content exceeds {MAX_PLAINTEXT_BYTES} bytes")
    content = loads(plaintext)
    resource = content["resource"]
    if sha256(b64d(content["salt"]) + canonical(resource)) != b64d(meta["commitment"]):
        raise IntegrityError(f"{ref}: decrypted content does not match its ledger commitment")
    return resource  # type: ignore[no-any-return]


def open_as(chain: str, meta: Mapping[str, Any], blob: bytes, reader_id: str,
            reader_private: bytes) -> dict[str, Any]:
    """Decrypt as ``reader_id`` with the key wrapped to it inside the blob."""
    wrapped = wrapped_key(blob, reader_id)
    if wrapped is None:
        raise Forbidden(f"{meta['type']}/{meta['id']} version {meta['v']}: its data key is "
                        f"not wrapped to {reader_id}")
    return open_blob(chain, meta, blob, reader_private, wrapped)


def rewrap_key(blob: bytes, reader_id: str, reader_private: bytes,
               new_reader_public: bytes, wrapper: envelope.BatchWrapper | None = None
               ) -> bytes:
    """The version's data key, unwrapped as ``reader_id`` and wrapped to a new reader
    (the result is itself a blob: the ledger gets its hash); by ``wrapper`` when many
    are re-wrapped at once (one ephemeral key per batch, ADR 4 section 7)."""
    wrapped = wrapped_key(blob, reader_id)
    if wrapped is None:
        raise Forbidden(f"the data key is not wrapped to {reader_id}")
    data_key = envelope.unwrap_key(wrapped, reader_private)
    if wrapper is not None:
        return wrapper.wrap(data_key, new_reader_public)
    return envelope.wrap_key(data_key, new_reader_public)


def open_any(chain: str, meta: Mapping[str, Any], blob: bytes, reader_id: str,
             privates: Sequence[bytes], rewrapped: Sequence[bytes] = ()) -> dict[str, Any]:
    """Decrypt as ``reader_id`` holding any of ``privates`` (a rotated identity keeps its
    earlier keys): the key wrapped inside the blob first, then keys re-wrapped to the
    reader later (``record.rewrap``). Raises the last failure if none opens it."""
    failure: Exception = Forbidden(f"{meta['type']}/{meta['id']} version {meta['v']}: its "
                                   f"data key is not wrapped to {reader_id}")
    inside = wrapped_key(blob, reader_id)
    for wrapped in ([inside] if inside is not None else []) + list(rewrapped):
        for private in privates:
            try:
                return open_blob(chain, meta, blob, private, wrapped)
            except Forbidden as err:  # not this key: try the next
                failure = err
    raise failure
