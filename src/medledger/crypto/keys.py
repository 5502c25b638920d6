"""Identities and password-protected keystores.

An identity is an id, a kind (organisation, practitioner, patient), an Ed25519
signing seed and an X25519 private key. Keystores hold them encrypted with
AES-256-GCM under a key derived from a password with scrypt; nothing private
ever goes on the ledger.

After a ``key.rotate`` an identity keeps its earlier X25519 private keys
(``previous``, newest first): data keys sealed before the rotation are wrapped to
them. The field is optional inside the encrypted payload, so keystores written
before it existed open unchanged (same keystore version).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.public import PrivateKey

from medledger.crypto.canonical import b64d, b64e, canonical, loads
from medledger.crypto.signing import Signer
from medledger.errors import Conflict, InvalidInput, Unauthenticated
from medledger.storage.files import write_private

KEYSTORE_VERSION = 1
DEFAULT_SCRYPT_N = 2**15


@dataclass(frozen=True)
class Identity:
    id: str
    kind: str  # "org" | "practitioner" | "patient"
    sign_seed: bytes = field(repr=False)
    enc_private: bytes = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    previous: tuple[bytes, ...] = field(default=(), repr=False)  # older enc keys, newest first

    @property
    def sign_public(self) -> bytes:
        return Signer(self.sign_seed).public_key

    @property
    def enc_public(self) -> bytes:
        return bytes(PrivateKey(self.enc_private).public_key)

    def signer(self) -> Signer:
        return Signer(self.sign_seed)

    @property
    def enc_privates(self) -> tuple[bytes, ...]:
        """Every X25519 private key this identity has held, the current one first."""
        return (self.enc_private, *self.previous)

    @property
    def secret_root(self) -> bytes:
        """The first X25519 key it ever held: the root of secrets derived for purely local
        use (they must survive a rotation; see docs/adr/0001)."""
        return self.previous[-1] if self.previous else self.enc_private

    def to_json(self) -> dict[str, Any]:
        doc = {
            "id": self.id,
            "kind": self.kind,
            "sign_seed": b64e(self.sign_seed),
            "enc_private": b64e(self.enc_private),
            "meta": self.meta,
        }
        if self.previous:
            doc["previous"] = [b64e(k) for k in self.previous]
        return doc

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        try:
            return cls(
                id=str(data["id"]),
                kind=str(data["kind"]),
                sign_seed=b64d(data["sign_seed"], field="sign_seed", size=32),
                enc_private=b64d(data["enc_private"], field="enc_private", size=32),
                meta=dict(data.get("meta") or {}),
                previous=tuple(b64d(k, field="previous", size=32)
                               for k in data.get("previous") or ()),
            )
        except KeyError as exc:
            raise InvalidInput(f"identity is missing {exc.args[0]!r}") from exc


def new_identity(id: str, kind: str, meta: dict[str, Any] | None = None) -> Identity:
    return Identity(id, kind, os.urandom(32), bytes(PrivateKey.generate()), dict(meta or {}))


def rotated(identity: Identity) -> Identity:
    """The same identity with fresh signing and encryption keys; the encryption key it
    replaces joins ``previous`` (what was sealed to it must still open)."""
    return Identity(identity.id, identity.kind, os.urandom(32), bytes(PrivateKey.generate()),
                    dict(identity.meta), (identity.enc_private, *identity.previous))


def _kdf(password: str, salt: bytes, n: int) -> bytes:
    return _scrypt(password.encode("utf-8"), salt, n)


def _scrypt(secret: bytes, salt: bytes, n: int) -> bytes:
    """scrypt (r=8, p=1, 32 bytes) through OpenSSL (``hashlib``), which releases the GIL
    while it works: a login on a worker thread does not stall the node's event loop
    (pyca's Rust scrypt holds the GIL). Same output as ``cryptography``'s ``Scrypt``."""
    return hashlib.scrypt(secret, salt=salt, n=n, r=8, p=1, dklen=32,
                          maxmem=129 * 8 * n + 2**20)


def lock(identity: Identity, password: str, n: int = DEFAULT_SCRYPT_N) -> bytes:
    """Encrypt an identity into keystore bytes (JSON)."""
    if len(password) < 8:
        raise InvalidInput("keystore password must be at least 8 characters")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {"version": KEYSTORE_VERSION, "id": identity.id, "kind": identity.kind,
              "kdf": {"name": "scrypt", "n": n, "r": 8, "p": 1, "salt": b64e(salt)}}
    box = AESGCM(_kdf(password, salt, n)).encrypt(nonce, canonical(identity.to_json()),
                                                   canonical(header))
    return canonical({**header, "nonce": b64e(nonce), "ciphertext": b64e(box)})


def unlock(data: bytes, password: str) -> Identity:
    """Decrypt keystore bytes. Wrong password raises ``Unauthenticated``."""
    doc = loads(data)
    if not isinstance(doc, dict) or doc.get("version") != KEYSTORE_VERSION:
        raise InvalidInput("not a medledger keystore (unknown format or version)")
    try:
        kdf = doc["kdf"]
        header = {k: doc[k] for k in ("version", "id", "kind", "kdf")}
        n = int(kdf["n"])
        if not 2**10 <= n <= 2**20 or n & (n - 1):
            raise InvalidInput(f"keystore scrypt n={n} is out of range (a power of two, 2^10-2^20)")
        key = _kdf(password, b64d(kdf["salt"], field="kdf.salt"), n)
        plain = AESGCM(key).decrypt(b64d(doc["nonce"], field="nonce"),
                                    b64d(doc["ciphertext"], field="ciphertext"),
                                    canonical(header))
    except KeyError as exc:
        raise InvalidInput(f"keystore is missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:  # wrong shapes, bad scrypt n, bad nonce length
        raise InvalidInput(f"keystore of {doc.get('id')} is corrupted: {exc}") from exc
    except InvalidTag as exc:
        raise Unauthenticated(f"wrong password for keystore of {doc.get('id')}") from exc
    return Identity.from_json(loads(plain))


def save_keystore(path: Path, identity: Identity, password: str, n: int = DEFAULT_SCRYPT_N,
                  exclusive: bool = False) -> None:
    """Write a keystore atomically; ``exclusive`` refuses to replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # exclusive: the final link fails if the path exists, no check-then-write race
        write_private(path, lock(identity, password, n), exclusive=exclusive)
    except FileExistsError as exc:
        raise Conflict(f"a keystore for {identity.id} already exists") from exc


def load_keystore(path: Path, password: str) -> Identity:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read keystore {path}: {exc.strerror}") from exc
    return unlock(data, password)
