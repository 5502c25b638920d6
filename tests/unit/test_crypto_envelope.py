"""crypto.envelope: AES-256-GCM records with X25519-wrapped data keys.

Wrong reader -> Forbidden; altered ciphertext, nonce or associated data -> IntegrityError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from nacl.public import PrivateKey

from medledger.crypto import envelope
from medledger.errors import Forbidden, IntegrityError

AAD = b'["chain","p1","Observation","o1",1]'


def _keypair(n: int) -> tuple[bytes, bytes]:
    sk = PrivateKey(hashlib.sha256(b"reader-%d" % n).digest())
    return bytes(sk), bytes(sk.public_key)


ALICE, BOB, EVE = _keypair(1), _keypair(2), _keypair(3)


def _counter_random() -> Callable[[int], bytes]:
    state = {"i": 0}

    def random(n: int) -> bytes:
        state["i"] += 1
        return hashlib.sha256(b"entropy-%d" % state["i"]).digest()[:n]

    return random


def _sealed(plaintext: bytes = b'{"resourceType":"Observation"}') -> envelope.Sealed:
    return envelope.seal(plaintext, AAD, {"alice": ALICE[1], "bob": BOB[1]})


def test_round_trip_for_every_reader() -> None:
    sealed = _sealed()
    assert sorted(sealed.wrapped_keys) == ["alice", "bob"]
    assert len(sealed.nonce) == envelope.NONCE_SIZE
    for rid, (sk, _) in (("alice", ALICE), ("bob", BOB)):
        assert envelope.open_for(sealed, AAD, rid, sk) == b'{"resourceType":"Observation"}'


def test_empty_plaintext_and_no_readers() -> None:
    sealed = envelope.seal(b"", AAD, {})
    assert sealed.wrapped_keys == {}
    with pytest.raises(Forbidden):
        envelope.open_for(sealed, AAD, "alice", ALICE[0])


def test_entropy_is_an_argument() -> None:
    a = envelope.seal(b"x", AAD, {"alice": ALICE[1]}, random=_counter_random())
    b = envelope.seal(b"x", AAD, {"alice": ALICE[1]}, random=_counter_random())
    assert (a.ciphertext, a.nonce) == (b.ciphertext, b.nonce)
    c = envelope.seal(b"x", AAD, {"alice": ALICE[1]})
    assert c.nonce != a.nonce


def test_reader_not_in_envelope_is_forbidden() -> None:
    with pytest.raises(Forbidden, match="not wrapped to eve"):
        envelope.open_for(_sealed(), AAD, "eve", EVE[0])


def test_wrong_private_key_is_forbidden() -> None:
    with pytest.raises(Forbidden, match="cannot unwrap"):
        envelope.open_for(_sealed(), AAD, "alice", EVE[0])
    with pytest.raises(Forbidden):
        envelope.open_for(_sealed(), AAD, "alice", b"short")


def test_tampered_wrapped_key_is_forbidden() -> None:
    sealed = _sealed()
    w = bytearray(sealed.wrapped_keys["alice"])
    w[-1] ^= 1
    bad = envelope.Sealed(sealed.ciphertext, sealed.nonce, {"alice": bytes(w)})
    with pytest.raises(Forbidden):
        envelope.open_for(bad, AAD, "alice", ALICE[0])


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampered_ciphertext_is_integrity_error(position: int) -> None:
    sealed = _sealed()
    ct = bytearray(sealed.ciphertext)
    ct[position] ^= 0x80
    bad = envelope.Sealed(bytes(ct), sealed.nonce, sealed.wrapped_keys)
    with pytest.raises(IntegrityError, match="failed authentication"):
        envelope.open_for(bad, AAD, "alice", ALICE[0])


@pytest.mark.parametrize(
    "aad",
    [b"", AAD + b" ", AAD.replace(b'"p1"', b'"p2"'), AAD.replace(b",1]", b",2]")],
    ids=["empty", "extended", "other-patient", "other-version"],
)
def test_other_binding_is_integrity_error(aad: bytes) -> None:
    with pytest.raises(IntegrityError):
        envelope.open_for(_sealed(), aad, "alice", ALICE[0])


@pytest.mark.parametrize(
    "nonce_edit",
    [lambda n: bytes([n[0] ^ 1]) + n[1:], lambda n: n[:-1], lambda n: b"", lambda n: n + b"\x00"],
    ids=["flipped", "short", "empty", "long"],
)
def test_tampered_nonce_is_integrity_error(nonce_edit: Callable[[bytes], bytes]) -> None:
    sealed = _sealed()
    bad = envelope.Sealed(sealed.ciphertext, nonce_edit(sealed.nonce), sealed.wrapped_keys)
    with pytest.raises(IntegrityError):
        envelope.open_for(bad, AAD, "alice", ALICE[0])


def test_truncated_ciphertext_is_integrity_error() -> None:
    sealed = _sealed()
    for ct in (sealed.ciphertext[:-1], sealed.ciphertext[:10], b""):
        with pytest.raises(IntegrityError):
            envelope.open_sealed(ct, sealed.nonce, AAD, envelope.unwrap_key(
                sealed.wrapped_keys["alice"], ALICE[0]))


def test_wrap_unwrap_key() -> None:
    key = bytes(range(32))
    assert envelope.unwrap_key(envelope.wrap_key(key, BOB[1]), BOB[0]) == key
