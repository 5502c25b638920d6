"""crypto.envelope: AES-256-GCM records with X25519-wrapped data keys.

Wrong reader -> Forbidden; altered ciphertext, nonce or associated data -> IntegrityError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from nacl.public import PrivateKey

from medledger.crypto import envelope
from medledger.errors import Forbidden, IntegrityError, InvalidInput

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


def test_wrap_key_takes_only_data_keys() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        envelope.wrap_key(b"k" * 31, BOB[1])


def test_sealed_box_of_any_payload() -> None:
    """Key-recovery shares are sealed boxes of longer payloads: they open with
    ``open_sealed_box``, never as a data key (a 57-byte payload makes a 105-byte box,
    the batch format's length)."""
    payload = b"p" * 57
    sealed = envelope.seal_to(payload, BOB[1])
    assert len(sealed) == envelope.BATCH_KEY_SIZE
    assert envelope.open_sealed_box(sealed, BOB[0]) == payload
    with pytest.raises(Forbidden):
        envelope.open_sealed_box(sealed, ALICE[0])
    with pytest.raises(Forbidden):
        envelope.unwrap_key(sealed, BOB[0])


# --- batch wrapping: one ephemeral key per (batch, reader) ---------------------------


def _batch(n: int = 2, random: Callable[[int], bytes] | None = None
           ) -> list[envelope.Sealed]:
    readers = {"alice": ALICE[1], "bob": BOB[1]}
    kwargs = {} if random is None else {"random": random}
    with envelope.BatchWrapper(**kwargs) as wrapper:
        return [envelope.seal(b"record %d" % i, AAD, readers, wrapper=wrapper, **kwargs)
                for i in range(n)]


def _fields(wrapped: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(version, ephemeral public key, nonce, ciphertext) of a batch-wrapped key."""
    return wrapped[0], wrapped[1:33], wrapped[33:57], wrapped[57:]


def test_batch_round_trip_for_every_reader() -> None:
    for i, sealed in enumerate(_batch(3)):
        for rid, sk in (("alice", ALICE[0]), ("bob", BOB[0])):
            assert envelope.open_for(sealed, AAD, rid, sk) == b"record %d" % i


def test_formats_have_distinct_sizes_and_the_batch_a_version_byte() -> None:
    batch = _batch(1)[0].wrapped_keys["alice"]
    single = _sealed().wrapped_keys["alice"]
    assert len(single) == envelope.SEALED_KEY_SIZE == 80
    assert len(batch) == envelope.BATCH_KEY_SIZE == 105
    assert batch[0] == envelope.BATCH_WRAP_VERSION == 1


def test_a_sealed_box_starting_with_the_version_byte_is_still_a_sealed_box() -> None:
    """A sealed box begins with a random ephemeral key: its first byte is 0x01 one time
    in 256. Its length, not that byte, says which format it is."""
    key = bytes(range(32))
    while (wrapped := envelope.wrap_key(key, ALICE[1]))[0] != envelope.BATCH_WRAP_VERSION:
        pass
    assert envelope.unwrap_key(wrapped, ALICE[0]) == key


def test_one_batch_one_ephemeral_key_per_reader_fresh_data_keys_and_nonces() -> None:
    first, second = _batch(2)
    for rid in ("alice", "bob"):
        a, b = _fields(first.wrapped_keys[rid]), _fields(second.wrapped_keys[rid])
        assert a[1] == b[1]  # the batch's ephemeral key for this reader
        assert a[2] != b[2]  # a random nonce per record
    assert _fields(first.wrapped_keys["alice"])[1] != _fields(first.wrapped_keys["bob"])[1]
    keys = [envelope.unwrap_key(s.wrapped_keys["alice"], ALICE[0]) for s in (first, second)]
    assert keys[0] != keys[1]  # every record its own data key
    assert keys == [envelope.unwrap_key(s.wrapped_keys["bob"], BOB[0]) for s in (first, second)]
    assert first.nonce != second.nonce
    other = _batch(1)[0]
    assert _fields(other.wrapped_keys["alice"])[1] != _fields(first.wrapped_keys["alice"])[1]


def test_batch_wrapper_drops_its_ephemeral_keys_on_exit() -> None:
    with envelope.BatchWrapper() as wrapper:
        before = wrapper.wrap(bytes(32), ALICE[1])
    assert wrapper._boxes == {}
    after = wrapper.wrap(bytes(32), ALICE[1])  # a new batch: a new ephemeral key
    assert _fields(before)[1] != _fields(after)[1]


def test_batch_wrapped_key_does_not_open_for_another_reader() -> None:
    sealed = _batch(1)[0]
    with pytest.raises(Forbidden, match="cannot unwrap"):
        envelope.open_for(sealed, AAD, "alice", EVE[0])
    with pytest.raises(Forbidden):  # alice's wrapped key, bob's private key
        envelope.unwrap_key(sealed.wrapped_keys["alice"], BOB[0])
    with pytest.raises(Forbidden):
        envelope.unwrap_key(sealed.wrapped_keys["alice"], b"short")


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: bytes([2]) + w[1:],  # unknown version
        lambda w: bytes([0]) + w[1:],
        lambda w: w[:1] + bytes([w[1] ^ 1]) + w[2:],  # ephemeral public key
        lambda w: w[:1] + bytes(32) + w[33:],  # a low-order point: no shared key
        lambda w: w[:1] + b"\x01" + bytes(31) + w[33:],
        lambda w: w[:40] + bytes([w[40] ^ 1]) + w[41:],  # nonce
        lambda w: w[:70] + bytes([w[70] ^ 1]) + w[71:],  # ciphertext
        lambda w: w[:-1] + bytes([w[-1] ^ 0x80]),  # tag end
        lambda w: w[:-1],
        lambda w: w + b"\x00",
        lambda w: w[:envelope.SEALED_KEY_SIZE],  # cut to a sealed box's length
        lambda w: b"",
    ],
    ids=["version-2", "version-0", "ephemeral", "ephemeral-zero", "ephemeral-one", "nonce",
         "ciphertext", "tag", "short", "long", "sealed-box-length", "empty"],
)
def test_tampered_batch_wrapped_key_is_forbidden(edit: Callable[[bytes], bytes]) -> None:
    sealed = _batch(1)[0]
    wrapped = sealed.wrapped_keys["alice"]
    assert envelope.unwrap_key(wrapped, ALICE[0])  # unaltered, it opens
    bad = envelope.Sealed(sealed.ciphertext, sealed.nonce, {"alice": edit(wrapped)})
    with pytest.raises(Forbidden):
        envelope.open_for(bad, AAD, "alice", ALICE[0])


def test_batch_shared_key_is_computed_once_per_reader_and_batch() -> None:
    batch = _batch(20)
    envelope._batch_box.cache_clear()
    for sealed in batch:
        envelope.open_for(sealed, AAD, "alice", ALICE[0])
    info = envelope._batch_box.cache_info()
    assert (info.misses, info.hits) == (1, 19)


def test_batch_entropy_is_an_argument() -> None:
    a = _batch(2, random=_counter_random())
    b = _batch(2, random=_counter_random())
    assert [s.wrapped_keys for s in a] == [s.wrapped_keys for s in b]
    assert a[0].wrapped_keys != a[1].wrapped_keys


@pytest.mark.parametrize("batch", [True, False], ids=["batch-wrap", "sealed-box"])
def test_wrapping_to_an_unusable_public_key_is_invalid_input(batch: bool) -> None:
    key = bytes(range(32))
    for public in (bytes(32), b"short"):  # a low-order point; not a key at all
        with pytest.raises(InvalidInput, match="not a usable X25519 key"):
            if batch:
                envelope.BatchWrapper().wrap(key, public)
            else:
                envelope.wrap_key(key, public)
