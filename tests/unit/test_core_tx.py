"""core.tx: wire format, signing bytes, hashing and shape checks.

Driven by vectors/tx_signed.json (fixed-seed signed txs and their hashes) and
vectors/tx_invalid.json (raw txs decode_tx must reject, with the error class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from medledger import errors
from medledger.core import tx as txmod
from medledger.core.tx import MAX_TX_BYTES, decode_tx, make_tx, signing_bytes
from medledger.crypto.canonical import sha256
from medledger.crypto.signing import Signer, verify

VECTORS = Path(__file__).parent / "vectors"
SIGNED: list[dict[str, Any]] = orjson.loads((VECTORS / "tx_signed.json").read_bytes())["vectors"]
INVALID_DOC: dict[str, Any] = orjson.loads((VECTORS / "tx_invalid.json").read_bytes())
INVALID: list[dict[str, Any]] = INVALID_DOC["vectors"]


@pytest.mark.parametrize("v", SIGNED, ids=[v["name"] for v in SIGNED])
def test_make_tx_reproduces_signed_vector(v: dict[str, Any]) -> None:
    signer = Signer(bytes.fromhex(v["seed"]))
    assert signer.public_key.hex() == v["sign_pub"]
    tx = make_tx(v["signer"], signer, v["chain"], v["kind"], v["body"], v["nonce"])
    assert tx.signing_bytes == v["signing_bytes"].encode()
    assert tx.raw == v["raw"].encode()
    assert tx.sig.hex() == v["sig"]
    assert tx.hash.hex() == v["hash"] == sha256(tx.raw).hex() == tx.hash_hex


@pytest.mark.parametrize("v", SIGNED, ids=[v["name"] for v in SIGNED])
def test_decode_signed_vector(v: dict[str, Any]) -> None:
    tx = decode_tx(v["raw"].encode())
    assert (tx.chain, tx.kind, tx.signer, tx.nonce) == (v["chain"], v["kind"], v["signer"],
                                                        v["nonce"])
    assert tx.body == v["body"]
    assert tx.hash.hex() == v["hash"]
    assert verify(bytes.fromhex(v["sign_pub"]), tx.signing_bytes, tx.sig)
    assert tx.signing_bytes == signing_bytes(v["chain"], v["kind"], v["signer"], v["nonce"],
                                             v["body"])


def test_signature_covers_every_field_but_sig() -> None:
    v = SIGNED[0]
    pub = bytes.fromhex(v["sign_pub"])
    tx = decode_tx(v["raw"].encode())
    for field, value in (("chain", "x"), ("kind", "batch"), ("signer", "org-z"),
                         ("nonce", "f" * 16), ("body", {"id": "x"})):
        args: dict[str, Any] = {"chain": tx.chain, "kind": tx.kind, "signer": tx.signer,
                                "nonce": tx.nonce, "body": tx.body, field: value}
        assert not verify(pub, signing_bytes(**args), tx.sig), field


def test_make_decode_round_trip_key_order_free() -> None:
    signer = Signer(b"\x07" * 32)
    a = make_tx("org-a", signer, "c", "consent.put", {"b": 1, "a": [2, {"d": 3, "c": 4}]},
                "0" * 16)
    b = make_tx("org-a", signer, "c", "consent.put", {"a": [2, {"c": 4, "d": 3}], "b": 1},
                "0" * 16)
    assert a.raw == b.raw and a.hash == b.hash
    back = decode_tx(a.raw)
    assert back == a


def test_invalid_vectors_start_from_a_valid_tx() -> None:
    decode_tx(INVALID_DOC["valid"].encode())
    assert len(INVALID) >= 30


@pytest.mark.parametrize("v", INVALID, ids=[v["name"] for v in INVALID])
def test_decode_rejects_invalid_vector(v: dict[str, Any]) -> None:
    raw = v["raw"].encode() if "raw" in v else bytes.fromhex(v["raw_hex"])
    expected = getattr(errors, v["error"])
    with pytest.raises(errors.MedledgerError) as info:
        decode_tx(raw)
    assert type(info.value) is expected
    assert info.value.code == expected.code


def test_oversized_tx_is_too_large() -> None:
    raw = b'{"body":{"pad":"' + b"a" * MAX_TX_BYTES + b'"}}'
    with pytest.raises(errors.TooLarge) as info:
        decode_tx(raw)
    assert info.value.code == 12 and isinstance(info.value, errors.InvalidInput)


def test_tx_at_the_size_limit_is_parsed() -> None:
    signer = Signer(b"\x01" * 32)
    small = make_tx("org-a", signer, "c", "audit.anchor", {"pad": ""}, "0" * 16)
    pad = "a" * (MAX_TX_BYTES - len(small.raw))
    tx = make_tx("org-a", signer, "c", "audit.anchor", {"pad": pad}, "0" * 16)
    assert len(tx.raw) == MAX_TX_BYTES
    assert decode_tx(tx.raw).hash == tx.hash


@pytest.mark.parametrize("good", ["a", "A-b.9", "x" * 64, "urn.uuid.5"])
def test_id_re_accepts(good: str) -> None:
    assert txmod.ID_RE.match(good)


@pytest.mark.parametrize("bad", ["", "x" * 65, "a/b", "a b", "a\n", "\na", "é", "a_b"])
def test_id_re_rejects(bad: str) -> None:
    assert not txmod.ID_RE.match(bad)


@pytest.mark.parametrize("bad", ["0" * 15, "0" * 65, "0" * 16 + "\n", "g" * 16, "A" * 16])
def test_nonce_re_rejects(bad: str) -> None:
    assert not txmod.NONCE_RE.match(bad)


def test_every_kind_has_a_handler() -> None:
    from medledger.core.machine import _HANDLERS

    assert set(_HANDLERS) == set(txmod.KINDS)
