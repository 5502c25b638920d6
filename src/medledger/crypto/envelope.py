"""Envelope encryption of record versions.

Each record version gets a fresh 256-bit data key. The content is sealed with
AES-256-GCM whose associated data binds it to (chain, patient, resource, version),
so a ciphertext cannot be replayed under another record. The data key is wrapped
to every reader's X25519 public key with a libsodium sealed box (ephemeral X25519
+ XSalsa20-Poly1305), so only holders of a matching private key can unwrap it.

Entropy is an argument (``random``) so tests and benchmarks can be reproducible;
production callers use the default ``os.urandom``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from medledger.errors import Forbidden, IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes
    nonce: bytes
    wrapped_keys: Mapping[str, bytes]  # reader id -> sealed-box wrapped data key


def seal(
    plaintext: bytes,
    aad: bytes,
    readers: Mapping[str, bytes],
    random: Callable[[int], bytes] = os.urandom,
) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key wrapped to each reader's X25519 key."""
    data_key = random(KEY_SIZE)
    nonce = random(NONCE_SIZE)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    wrapped = {rid: wrap_key(data_key, pub) for rid, pub in sorted(readers.items())}
    return Sealed(ciphertext, nonce, wrapped)


def wrap_key(data_key: bytes, reader_public: bytes) -> bytes:
    return SealedBox(PublicKey(reader_public)).encrypt(data_key)


@functools.lru_cache(maxsize=64)
def _opener(reader_private: bytes) -> SealedBox[PrivateKey]:
    """A reader's sealed-box opener, kept: building one derives the public key (slow)."""
    return SealedBox(PrivateKey(reader_private))


def unwrap_key(wrapped: bytes, reader_private: bytes) -> bytes:
    try:
        return _opener(reader_private).decrypt(wrapped)
    except CryptoError as exc:
        raise Forbidden("this key cannot unwrap the record's data key") from exc


def open_sealed(ciphertext: bytes, nonce: bytes, aad: bytes, data_key: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError) as exc:  # ValueError: nonce or key of a wrong length
        raise IntegrityError(
            "record ciphertext failed authentication (altered bytes or wrong record binding)"
        ) from exc


def open_for(sealed: Sealed, aad: bytes, reader_id: str, reader_private: bytes) -> bytes:
    """Unwrap the data key as ``reader_id`` and decrypt."""
    wrapped = sealed.wrapped_keys.get(reader_id)
    if wrapped is None:
        raise Forbidden(f"the record's data key is not wrapped to {reader_id}")
    return open_sealed(sealed.ciphertext, sealed.nonce, aad, unwrap_key(wrapped, reader_private))
