"""Envelope encryption of record versions, and the wrapping of data keys to readers.

Each record version gets a fresh 256-bit data key. The content is sealed with
AES-256-GCM whose associated data binds it to (chain, patient, resource, version),
so a ciphertext cannot be replayed under another record. The data key is wrapped
to every reader's X25519 public key, so only holders of a matching private key can
unwrap it. A wrapped data key has one of two self-contained formats, told apart by
length (and, for the second, a version byte):

- **sealed box** (80 bytes, :func:`wrap_key`): libsodium ``crypto_box_seal`` — a fresh
  ephemeral X25519 key pair per wrapped key. Single writes and re-wraps use it.
- **batch wrap** (105 bytes, :class:`BatchWrapper`): ``0x01 ‖ ephemeral public (32) ‖
  nonce (24) ‖ XSalsa20-Poly1305 ciphertext (48)``. One ephemeral key pair per
  (batch, reader); its shared key (``crypto_box_beforenm``) is computed once and every
  record's data key is boxed under it with a random nonce. Sealing a chunk of a large
  import costs one X25519 operation per reader instead of two per record and reader.

:func:`unwrap_key` opens both, and keeps the shared key of recent (reader,
ephemeral key) pairs: the records of one batch share it. :func:`seal_to` and
:func:`open_sealed_box` are plain sealed boxes of any payload (key-recovery shares).

Entropy is an argument (``random``) so tests and benchmarks can be reproducible;
production callers use the default ``os.urandom``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox

from medledger.errors import Forbidden, IntegrityError, InvalidInput

KEY_SIZE = 32
NONCE_SIZE = 12
SEALED_BOX_OVERHEAD = 48  # crypto_box_SEALBYTES: ephemeral public key + Poly1305 tag
SEALED_KEY_SIZE = SEALED_BOX_OVERHEAD + KEY_SIZE  # 80
BATCH_WRAP_VERSION = 0x01
BATCH_NONCE_SIZE = Box.NONCE_SIZE  # 24: random nonces are safe with XSalsa20
BOX_TAG_SIZE = 16  # Poly1305
BATCH_KEY_SIZE = 1 + KEY_SIZE + BATCH_NONCE_SIZE + BOX_TAG_SIZE + KEY_SIZE  # 105
UNWRAP_CACHE_SIZE = 256  # (reader private, ephemeral public) shared keys kept


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes
    nonce: bytes
    wrapped_keys: Mapping[str, bytes]  # reader id -> wrapped data key (either format)


class BatchWrapper:
    """Wraps the data keys of one batch of records: one ephemeral X25519 key pair per
    reader public key, its shared key precomputed once; each data key boxed under a
    random 24-byte nonce. Use it for one batch (``with BatchWrapper() as w:``): on exit
    the ephemeral private keys are dropped (a later wrap would start new ones)."""

    def __init__(self, random: Callable[[int], bytes] = os.urandom) -> None:
        self._random = random
        self._boxes: dict[bytes, tuple[bytes, Box]] = {}  # reader public -> (eph. pub, box)

    def wrap(self, data_key: bytes, reader_public: bytes) -> bytes:
        """``data_key`` wrapped to ``reader_public`` in the batch format (105 bytes)."""
        _check_data_key(data_key)
        ephemeral_public, box = self._box(reader_public)
        boxed = box.encrypt(data_key, self._random(BATCH_NONCE_SIZE))  # nonce ‖ ciphertext
        return bytes([BATCH_WRAP_VERSION]) + ephemeral_public + bytes(boxed)

    def _box(self, reader_public: bytes) -> tuple[bytes, Box]:
        entry = self._boxes.get(reader_public)
        if entry is None:
            ephemeral = PrivateKey(self._random(KEY_SIZE))
            try:
                box = Box(ephemeral, PublicKey(reader_public))
            except CryptoError as exc:
                raise InvalidInput("a reader's public key is not a usable X25519 key") from exc
            entry = self._boxes[reader_public] = (bytes(ephemeral.public_key), box)
        return entry

    def close(self) -> None:
        self._boxes.clear()

    def __enter__(self) -> BatchWrapper:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def seal(
    plaintext: bytes,
    aad: bytes,
    readers: Mapping[str, bytes],
    random: Callable[[int], bytes] = os.urandom,
    wrapper: BatchWrapper | None = None,
) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key wrapped to each reader's X25519 key
    (by ``wrapper`` when sealed as part of a batch, else one sealed box per reader)."""
    data_key = random(KEY_SIZE)
    nonce = random(NONCE_SIZE)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    wrap = wrap_key if wrapper is None else wrapper.wrap
    wrapped = {rid: wrap(data_key, pub) for rid, pub in sorted(readers.items())}
    return Sealed(ciphertext, nonce, wrapped)


def wrap_key(data_key: bytes, reader_public: bytes) -> bytes:
    """``data_key`` wrapped to ``reader_public`` in a sealed box (80 bytes)."""
    _check_data_key(data_key)
    return seal_to(data_key, reader_public)


def _check_data_key(data_key: bytes) -> None:
    if len(data_key) != KEY_SIZE:  # the formats are told apart by length
        raise InvalidInput(f"a data key is {KEY_SIZE} bytes, not {len(data_key)}")


def seal_to(payload: bytes, reader_public: bytes) -> bytes:
    """Any ``payload`` in a sealed box to ``reader_public`` (48 bytes longer)."""
    try:
        return SealedBox(PublicKey(reader_public)).encrypt(payload)
    except CryptoError as exc:
        raise InvalidInput("a reader's public key is not a usable X25519 key") from exc


@functools.lru_cache(maxsize=64)
def _private_key(reader_private: bytes) -> PrivateKey:
    """A reader's key, kept: building one derives the public key (slow)."""
    return PrivateKey(reader_private)


@functools.lru_cache(maxsize=64)
def _opener(reader_private: bytes) -> SealedBox[PrivateKey]:
    return SealedBox(_private_key(reader_private))


@functools.lru_cache(maxsize=UNWRAP_CACHE_SIZE)
def _batch_box(reader_private: bytes, ephemeral_public: bytes) -> Box:
    """The shared key of a batch as one reader computes it (one X25519 operation),
    kept: a patient's records sealed in one batch share it."""
    return Box(_private_key(reader_private), PublicKey(ephemeral_public))


def open_sealed_box(sealed: bytes, reader_private: bytes) -> bytes:
    """The payload of a sealed box (:func:`seal_to`); ``Forbidden`` if this key cannot."""
    try:
        return _opener(bytes(reader_private)).decrypt(sealed)
    except CryptoError as exc:
        raise Forbidden("this key cannot open the sealed box") from exc


def unwrap_key(wrapped: bytes, reader_private: bytes) -> bytes:
    """A data key wrapped in either format; ``Forbidden`` if this key cannot unwrap it
    (another reader's, altered bytes, or not a wrapped data key at all)."""
    reader_private = bytes(reader_private)
    try:
        if len(wrapped) == SEALED_KEY_SIZE:
            return _opener(reader_private).decrypt(wrapped)
        if len(wrapped) == BATCH_KEY_SIZE and wrapped[0] == BATCH_WRAP_VERSION:
            ephemeral_public = bytes(wrapped[1:1 + KEY_SIZE])
            nonce = wrapped[1 + KEY_SIZE:1 + KEY_SIZE + BATCH_NONCE_SIZE]
            boxed = wrapped[1 + KEY_SIZE + BATCH_NONCE_SIZE:]
            return _batch_box(reader_private, ephemeral_public).decrypt(boxed, nonce)
    except CryptoError as exc:
        raise Forbidden("this key cannot unwrap the record's data key") from exc
    raise Forbidden(f"this is not a wrapped data key ({len(wrapped)} bytes: neither a "
                    f"{SEALED_KEY_SIZE}-byte sealed box nor a {BATCH_KEY_SIZE}-byte batch "
                    f"wrap of version {BATCH_WRAP_VERSION})")


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
