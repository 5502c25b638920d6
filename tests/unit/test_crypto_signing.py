"""crypto.signing: Ed25519 via PyNaCl; ``verify`` answers True/False and never raises."""

from __future__ import annotations

import pytest

from medledger.crypto import signing

# RFC 8032 section 7.1, TEST 1 and TEST 2.
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
     "d25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c"
     "387b2eaeb4302aeeb00d291612bb0c00"),
]

SEED = bytes(range(32))


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(seed: str, public: str, message: str, signature: str) -> None:
    s, m = bytes.fromhex(seed), bytes.fromhex(message)
    assert signing.public_key(s).hex() == public
    assert signing.sign(s, m).hex() == signature
    assert signing.Signer(s).sign(m).hex() == signature
    assert signing.Signer(s).public_key.hex() == public
    assert signing.verify(bytes.fromhex(public), m, bytes.fromhex(signature))


def test_verify_true_and_false() -> None:
    signer = signing.Signer(SEED)
    sig = signer.sign(b"message")
    assert signing.verify(signer.public_key, b"message", sig)
    assert not signing.verify(signer.public_key, b"messagf", sig)
    assert not signing.verify(signing.public_key(b"\x01" * 32), b"message", sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not signing.verify(signer.public_key, b"message", flipped)


@pytest.mark.parametrize(
    ("public_len", "sig_len"), [(0, 64), (31, 64), (33, 64), (32, 0), (32, 63), (32, 65)]
)
def test_wrong_sizes_return_false(public_len: int, sig_len: int) -> None:
    pub = signing.public_key(SEED)
    sig = signing.sign(SEED, b"m")
    pub = (pub * 2)[:public_len]
    sig = (sig * 2)[:sig_len]
    assert signing.verify(pub, b"m", sig) is False


@pytest.mark.parametrize(
    "public",
    [b"\x00" * 32, b"\xff" * 32, bytes.fromhex("01" + "00" * 31)],  # not a point / low order
    ids=["zeros", "ones", "identity"],
)
def test_junk_public_keys_return_false(public: bytes) -> None:
    assert signing.verify(public, b"m", signing.sign(SEED, b"m")) is False
