"""The machine's own ceilings, measured in the same run as the figures they bound.

Each is a raw primitive with nothing of medledger around it: PyNaCl Ed25519 verify,
AES-256-GCM on 2 KiB, X25519 sealed-box unwrap, SHA-256, SQLite batched inserts
(WAL, synchronous=NORMAL, as the store runs) and one-row committed inserts (the
durable audit write of a read). Composite ceilings add up per-op costs.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey


def _rate(fn: Callable[[], None], min_s: float = 0.4) -> float:
    """Calls per second of ``fn`` (looped for at least ``min_s``)."""
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(100):
            fn()
        n += 100
        took = time.perf_counter() - t0
        if took >= min_s:
            return n / took


def ed25519_verify_per_s(msg_bytes: int = 3000) -> float:
    key = SigningKey.generate()
    msg = os.urandom(msg_bytes)
    sig = key.sign(msg).signature
    vk = key.verify_key
    return _rate(lambda: vk.verify(msg, sig))


def aes_gcm_per_s(size: int = 2048, decrypt: bool = False) -> float:
    aes, nonce, data = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(size)
    ct = aes.encrypt(nonce, data, b"aad")
    if decrypt:
        return _rate(lambda: aes.decrypt(nonce, ct, b"aad"))
    return _rate(lambda: aes.encrypt(nonce, data, b"aad"))


def x25519_unwrap_per_s() -> float:
    sk = PrivateKey.generate()
    wrapped = SealedBox(sk.public_key).encrypt(os.urandom(32))
    box = SealedBox(sk)
    return _rate(lambda: box.decrypt(wrapped))


def sha256_mb_per_s() -> float:
    block = os.urandom(1 << 20)
    return _rate(lambda: hashlib.sha256(block).digest(), 0.5)  # 1 MiB per call ~ MB/s


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    return db


def sqlite_batched_inserts_per_s(row_bytes: int = 3000, batch: int = 2000,
                                 total: int = 40_000) -> float:
    """Rows/s inserting ``row_bytes`` rows, one transaction per ``batch`` (a block)."""
    with tempfile.TemporaryDirectory() as d:
        db = _db(Path(d) / "c.db")
        payload = os.urandom(row_bytes)
        rows = [(os.urandom(32), payload) for _ in range(total)]
        t0 = time.perf_counter()
        for i in range(0, total, batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO t VALUES (?, ?)", rows[i:i + batch])
            db.execute("COMMIT")
        took = time.perf_counter() - t0
        db.close()
    return total / took


def sqlite_commit_per_s(row_bytes: int = 600) -> float:
    """One-row transactions/s (BEGIN IMMEDIATE; INSERT; COMMIT), as a durable audit write."""
    with tempfile.TemporaryDirectory() as d:
        db = _db(Path(d) / "c.db")
        payload = os.urandom(row_bytes)

        def one() -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", (os.urandom(16), payload))
            db.execute("COMMIT")
        rate = _rate(one)
        db.close()
    return rate


def measure() -> dict[str, Any]:
    c: dict[str, Any] = {
        "ed25519_verify_per_s": ed25519_verify_per_s(),
        "aes_gcm_2k_encrypt_per_s": aes_gcm_per_s(),
        "aes_gcm_2k_decrypt_per_s": aes_gcm_per_s(decrypt=True),
        "x25519_unwrap_per_s": x25519_unwrap_per_s(),
        "sha256_mb_per_s": sha256_mb_per_s() * (1 << 20) / 1e6,
        "sqlite_batched_3k_rows_per_s": sqlite_batched_inserts_per_s(),
        "sqlite_one_row_commits_per_s": sqlite_commit_per_s(),
    }
    # write: verify the tx signature + AES-GCM of the resource + insert the tx row
    c["write_ceiling_tx_per_s"] = 1 / (1 / c["ed25519_verify_per_s"]
                                       + 1 / c["aes_gcm_2k_encrypt_per_s"]
                                       + 1 / c["sqlite_batched_3k_rows_per_s"])
    # read: unwrap the data key + AES-GCM decrypt + one committed audit row
    c["read_ceiling_per_s"] = 1 / (1 / c["x25519_unwrap_per_s"]
                                   + 1 / c["aes_gcm_2k_decrypt_per_s"]
                                   + 1 / c["sqlite_one_row_commits_per_s"])
    c["read_ceiling_us"] = 1e6 / c["read_ceiling_per_s"]
    return c


if __name__ == "__main__":
    for k, v in measure().items():
        print(f"{k:32} {v:14,.1f}")
