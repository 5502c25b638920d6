"""crypto.keys: identities and password-protected keystores (scrypt n=2**10 to stay fast)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from medledger.crypto import keys, signing
from medledger.crypto.canonical import b64e
from medledger.errors import InvalidInput, Unauthenticated

N = 2**10
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ident() -> keys.Identity:
    return keys.Identity("dr-who", "practitioner", bytes(range(32)), bytes(range(32, 64)),
                         {"role": "physician"})


@pytest.fixture(scope="module")
def locked(ident: keys.Identity) -> bytes:
    return keys.lock(ident, PASSWORD, n=N)


def test_identity_keys(ident: keys.Identity) -> None:
    assert ident.sign_public == signing.public_key(ident.sign_seed)
    assert len(ident.enc_public) == 32
    assert ident.signer().public_key == ident.sign_public
    assert "sign_seed" not in repr(ident) and "enc_private" not in repr(ident)


def test_identity_json_round_trip(ident: keys.Identity) -> None:
    back = keys.Identity.from_json(ident.to_json())
    assert back == ident and back.meta == ident.meta


@pytest.mark.parametrize("missing", ["id", "kind", "sign_seed", "enc_private"])
def test_identity_json_missing_field(ident: keys.Identity, missing: str) -> None:
    doc = ident.to_json()
    del doc[missing]
    with pytest.raises(InvalidInput, match=missing):
        keys.Identity.from_json(doc)


def test_identity_json_wrong_key_size(ident: keys.Identity) -> None:
    with pytest.raises(InvalidInput, match="sign_seed must be 32 bytes"):
        keys.Identity.from_json({**ident.to_json(), "sign_seed": b64e(b"\x00" * 31)})


def test_new_identity_is_random() -> None:
    a, b = keys.new_identity("a", "patient"), keys.new_identity("a", "patient")
    assert a.sign_seed != b.sign_seed and a.enc_private != b.enc_private


def test_lock_unlock_round_trip(ident: keys.Identity, locked: bytes) -> None:
    doc = orjson.loads(locked)
    assert doc["id"] == "dr-who" and doc["kdf"]["n"] == N
    assert b64e(ident.sign_seed) not in locked.decode()
    back = keys.unlock(locked, PASSWORD)
    assert back == ident and back.meta == {"role": "physician"}


def test_lock_is_salted(ident: keys.Identity, locked: bytes) -> None:
    assert keys.lock(ident, PASSWORD, n=N) != locked


def test_wrong_password_is_unauthenticated(locked: bytes) -> None:
    with pytest.raises(Unauthenticated, match="wrong password"):
        keys.unlock(locked, PASSWORD + "!")


def test_short_password_refused(ident: keys.Identity) -> None:
    with pytest.raises(InvalidInput, match="at least 8"):
        keys.lock(ident, "short", n=N)


def _edit(locked: bytes, **changes: Any) -> bytes:
    return orjson.dumps({**orjson.loads(locked), **changes})


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: b"not json",
        lambda d: b"[]",
        lambda d: d[: len(d) // 2],
        lambda d: _edit(d, version=2),
        lambda d: _edit(d, kdf="scrypt"),
        lambda d: _edit(d, kdf={**orjson.loads(d)["kdf"], "n": 1000}),
        lambda d: _edit(d, kdf={**orjson.loads(d)["kdf"], "n": "many"}),
        lambda d: _edit(d, kdf={**orjson.loads(d)["kdf"], "salt": "***"}),
        lambda d: _edit(d, nonce=""),
        lambda d: _edit(d, nonce=12),
        lambda d: _edit(d, ciphertext="@@"),
        lambda d: orjson.dumps({k: v for k, v in orjson.loads(d).items() if k != "ciphertext"}),
        lambda d: orjson.dumps({k: v for k, v in orjson.loads(d).items() if k != "kdf"}),
    ],
    ids=["not-json", "not-object", "truncated", "version", "kdf-not-object", "n-not-pow2",
         "n-not-int", "salt-alphabet", "empty-nonce", "nonce-not-str", "ct-alphabet",
         "no-ciphertext", "no-kdf"],
)
def test_corrupted_keystore_is_invalid_input(locked: bytes, corrupt: Any) -> None:
    with pytest.raises(InvalidInput):
        keys.unlock(corrupt(locked), PASSWORD)


@pytest.mark.parametrize("field", ["id", "kind"])
def test_altered_header_fails_authentication(locked: bytes, field: str) -> None:
    # The header is the AEAD's associated data: relabelling a keystore is detected.
    with pytest.raises(Unauthenticated):
        keys.unlock(_edit(locked, **{field: "someone-else"}), PASSWORD)


def test_save_and_load_keystore(tmp_path: Path, ident: keys.Identity) -> None:
    path = tmp_path / "keys" / "dr-who.json"
    keys.save_keystore(path, ident, PASSWORD, n=N)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not path.with_suffix(".tmp").exists()
    assert keys.load_keystore(path, PASSWORD) == ident
    with pytest.raises(Unauthenticated):
        keys.load_keystore(path, "wrong password")


def test_load_missing_keystore(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read keystore"):
        keys.load_keystore(tmp_path / "absent.json", PASSWORD)


def test_rotated_identity_keeps_earlier_encryption_keys(ident: keys.Identity) -> None:
    once = keys.rotated(ident)
    twice = keys.rotated(once)
    assert (once.id, once.kind, once.meta) == (ident.id, ident.kind, ident.meta)
    assert once.sign_seed != ident.sign_seed and once.enc_private != ident.enc_private
    assert twice.enc_privates == (twice.enc_private, once.enc_private, ident.enc_private)
    assert ident.secret_root == once.secret_root == twice.secret_root == ident.enc_private
    assert "previous" not in ident.to_json()  # unrotated keystores are byte-for-byte as before
    back = keys.unlock(keys.lock(twice, PASSWORD, n=N), PASSWORD)
    assert back == twice and back.previous == twice.previous


def test_keystore_without_previous_keys_still_opens(ident: keys.Identity, locked: bytes) -> None:
    """A keystore written before rotations existed (same version, no ``previous``)."""
    opened = keys.unlock(locked, PASSWORD)
    assert opened.previous == () and opened.enc_privates == (ident.enc_private,)


def test_bad_previous_key_is_refused(ident: keys.Identity) -> None:
    doc = {**ident.to_json(), "previous": ["not-a-key"]}
    with pytest.raises(InvalidInput):
        keys.Identity.from_json(doc)
