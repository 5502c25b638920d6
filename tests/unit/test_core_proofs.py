"""core.proofs: offline inclusion proofs of txs and audit events against a block header."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.core import proofs
from medledger.core.machine import BlockInput, apply_block
from medledger.core.state import MemoryState
from medledger.crypto import merkle
from medledger.crypto.canonical import b64e


def _block(n_txs: int) -> dict[str, Any]:
    """A header over ``n_txs`` junk txs (all refused; roots still cover them)."""
    txs = tuple(b"tx-%d" % i for i in range(n_txs))
    applied = apply_block(MemoryState(), BlockInput("c", 1, 5, txs, b"\0" * 32, b"\0" * 32))
    return {"header": applied.header, "txs": list(txs), "hash": applied.header_hash.hex()}


BLOCK5 = _block(5)


@pytest.mark.parametrize("index", range(5))
def test_every_tx_proves(index: int) -> None:
    doc = proofs.make_proof("tx", BLOCK5["header"], BLOCK5["txs"], index)
    assert doc["tree_size"] == 5 and doc["header_hash"] == BLOCK5["hash"]
    assert proofs.verify_proof(doc)
    assert proofs.verify_proof(doc, trusted_header_hash=BLOCK5["hash"])
    assert not proofs.verify_proof(doc, trusted_header_hash="00" * 32)


def _tampered(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    header = doc["header"]
    return [
        ("leaf", {**doc, "leaf": b64e(b"tx-9")}),
        ("index", {**doc, "index": doc["index"] + 1}),
        ("kind", {**doc, "kind": "audit"}),
        ("unknown kind", {**doc, "kind": "state"}),
        ("path truncated", {**doc, "path": doc["path"][:-1]}),
        ("path extended", {**doc, "path": [*doc["path"], "00" * 32]}),
        ("path not hex", {**doc, "path": ["zz"]}),
        ("leaf not base64url", {**doc, "leaf": "!!"}),
        ("header root", {**doc, "header": {**header, "tx_root": "11" * 32}}),
        ("header height", {**doc, "header": {**header, "height": 2}}),
        ("header hash", {**doc, "header_hash": "00" * 32}),
        ("no header", {k: v for k, v in doc.items() if k != "header"}),
        ("index not int", {**doc, "index": "one"}),
    ]


@pytest.mark.parametrize("index", range(5))
def test_tampered_proofs_fail(index: int) -> None:
    doc = proofs.make_proof("tx", BLOCK5["header"], BLOCK5["txs"], index)
    for name, bad in _tampered(doc):
        assert not proofs.verify_proof(bad), name


def test_claimed_position_is_bound_by_the_header() -> None:
    # Leaf 4 of a 5-leaf tree has a one-element path [MTH(leaves 0..3)]; RFC 9162
    # verification alone also accepts it as leaf 2 of a 3-leaf tree.
    doc = proofs.make_proof("tx", BLOCK5["header"], BLOCK5["txs"], 4)
    root = bytes.fromhex(BLOCK5["header"]["tx_root"])
    path = [bytes.fromhex(p) for p in doc["path"]]
    assert merkle.verify_inclusion(b"tx-4", 2, 3, path, root)
    assert not proofs.verify_proof({**doc, "index": 2, "tree_size": 3})


def test_audit_proof_uses_audit_root() -> None:
    header = {**BLOCK5["header"], "n_audit": 2,
              "audit_root": merkle.root([b"ev-0", b"ev-1"]).hex()}
    doc = proofs.make_proof("audit", header, [b"ev-0", b"ev-1"], 1)
    assert proofs.verify_proof(doc)
    assert not proofs.verify_proof({**doc, "kind": "tx"})
