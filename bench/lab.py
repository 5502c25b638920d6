"""Benchmark fixtures: a fresh node home with an in-process ledger, and realistic txs.

Everything a figure needs to build state fast *through the real code*: a node home
(``node.home.init_home``), a ``LedgerApp`` over its SQLite store, blocks produced
with ``finalize_block`` + ``commit`` (as ``SoloProducer`` does), and client-signed
``record.put`` txs for synthetic FHIR Observations (1-3 KiB) sealed with
``node.records.seal_record`` (the tx commits to the sealed blob; the blob goes to the
lab's blob store, ADR 4). Tx generation fans out over worker processes.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from medledger.consensus.app import TxResult
from medledger.core.tx import make_tx
from medledger.crypto import keys, localseal
from medledger.crypto.canonical import b64e, canonical, sha256
from medledger.fhir.labels import classify
from medledger.fhir.synthetic import synthetic_observation
from medledger.node.home import Home, init_home
from medledger.node.ledger_app import LedgerApp
from medledger.node.records import seal_record
from medledger.storage.blobs import BlobStore
from medledger.storage.sqlite import SqliteStore

PASSWORD = "bench-password"
BLOCK_TXS = 2000
SCRYPT_N = 2**12  # keystores of bench identities: cheap to unlock, never used for real data
BULK_CACHE_KIB = 1024 * 1024  # ``Lab(bulk=True)``: a 1 GiB SQLite page cache for the build


@dataclass(frozen=True)
class PatientKey:
    id: str
    enc_public: bytes


class Nonces:
    """Unique lowercase-hex nonces per process (random prefix + counter)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n:016x}"


def register_body(identity: keys.Identity, role: str | None = None) -> dict[str, Any]:
    body = {"id": identity.id, "kind": identity.kind, "sign_pub": b64e(identity.sign_public),
            "enc_pub": b64e(identity.enc_public)}
    if role:
        body["role"] = role
    return body


def record_body(chain: str, org: keys.Identity | PatientKey, patient: PatientKey,
                rid: str, seed: int, org_enc_public: bytes) -> tuple[dict[str, Any], bytes]:
    """(``record.put`` body, sealed blob) for a fresh synthetic Observation (version 1)."""
    resource = {**synthetic_observation(patient.id, seed), "id": rid}
    cls = classify(resource)
    readers = {org.id: org_enc_public, patient.id: patient.enc_public}
    fields, blob = seal_record(chain, resource, patient.id, 1, readers)
    return {"type": "Observation", "id": rid, "version": 1, "prev": "", "patient": patient.id,
            "category": cls.category, "labels": sorted(cls.labels), **fields}, blob


Sealed = tuple[str, bytes, str, bytes]  # resource id, raw tx, blob hash, blob


def _record_txs_chunk(args: tuple[str, dict[str, Any], list[PatientKey], int, int, str]
                      ) -> list[Sealed]:
    chain, org_json, patients, start, count, tag = args
    org = keys.Identity.from_json(org_json)
    signer, enc_pub, nonce = org.signer(), org.enc_public, Nonces()
    out = []
    for i in range(start, start + count):
        rid = f"{tag}-{i}"
        body, blob = record_body(chain, org, patients[i % len(patients)], rid, i, enc_pub)
        out.append((rid, make_tx(org.id, signer, chain, "record.put", body, nonce()).raw,
                    body["blob"], blob))
    return out


def record_txs(chain: str, org: keys.Identity, patients: list[PatientKey], n: int, tag: str,
               workers: int | None = None,
               blobs: Callable[[list[tuple[str, bytes]]], None] | None = None
               ) -> list[tuple[str, bytes]]:
    """``n`` signed ``record.put`` txs ``(resource id, raw)``, built on ``workers`` processes;
    their sealed blobs go to ``blobs`` (a blob store's ``put``), or nowhere."""
    workers = workers or os.cpu_count() or 1
    if n < 2000 or workers == 1:
        sealed = _record_txs_chunk((chain, org.to_json(), patients, 0, n, tag))
    else:
        step = 5000
        jobs = [(chain, org.to_json(), patients, s, min(step, n - s), tag)
                for s in range(0, n, step)]
        sealed = []
        with ProcessPoolExecutor(workers) as pool:
            for chunk in pool.map(_record_txs_chunk, jobs):
                sealed.extend(chunk)
    if blobs is not None:
        blobs([(h, blob) for _, _, h, blob in sealed])
    return [(rid, raw) for rid, raw, _, _ in sealed]


def record_txs_stream(chain: str, org: keys.Identity, patients: list[PatientKey], n: int,
                      tag: str, chunk: int = BLOCK_TXS, workers: int | None = None
                      ) -> Iterator[list[Sealed]]:
    """Like ``record_txs``, as chunks of ``chunk`` sealed txs in order while the worker
    processes build the next ones (a bounded number ahead: memory stays flat at any ``n``)."""
    workers = workers or os.cpu_count() or 1
    jobs = iter([(chain, org.to_json(), patients, s, min(chunk, n - s), tag)
                 for s in range(0, n, chunk)])
    with ProcessPoolExecutor(workers) as pool:
        ahead: deque[Future[list[Sealed]]] = deque(
            pool.submit(_record_txs_chunk, job) for job in islice(jobs, 2 * workers + 2))
        while ahead:
            done = ahead.popleft().result()
            job = next(jobs, None)
            if job is not None:
                ahead.append(pool.submit(_record_txs_chunk, job))
            yield done


class Lab:
    """A node home for org ``org_id`` with its ledger open in-process."""

    def __init__(self, root: Path, org_id: str = "org-bench", chain: str = "medledger-bench",
                 port: int = 8700, bulk: bool = False) -> None:
        self.bulk = bulk
        self.home: Home = init_home(root, org_id, "Bench Hospital", PASSWORD, chain=chain,
                                    port=port, scrypt_n=SCRYPT_N)
        self.org = self.home.unlock_org(PASSWORD)
        self.chain = chain
        self.nonce = Nonces()
        self.signer = self.org.signer()
        self.time_ns = time.time_ns()
        self.patients: list[PatientKey] = []
        self.records: list[str] = []
        self.open()
        genesis = self.home.load_genesis()
        self.app.init_chain(chain, canonical({"orgs": genesis["orgs"]}), 0)

    def open(self) -> None:
        self.store = SqliteStore(self.home.db_path, synchronous="OFF" if self.bulk else "NORMAL")
        self.blobs = BlobStore(self.home.blobs_path)
        if self.bulk:  # a throwaway bench chain: no fsync, and a page cache for the build
            self.store.db.execute(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
            self.store.db.execute("PRAGMA wal_autocheckpoint=16384")
            self.blobs.db.execute("PRAGMA synchronous=OFF")
            self.blobs.db.execute("PRAGMA cache_size=-262144")  # its hash index, at 1M blobs
        # sealed like a node's own store, so a node started on this home passes its start check
        self.store.set_seal_key(localseal.derive_seal_key(self.org.secret_root, self.chain))
        self.app = LedgerApp(self.store, self.chain)

    def close(self) -> None:
        self.store.close()
        self.blobs.close()

    def tx(self, kind: str, body: dict[str, Any], identity: keys.Identity | None = None) -> bytes:
        ident = identity or self.org
        signer = self.signer if identity is None else ident.signer()
        return make_tx(ident.id, signer, self.chain, kind, body, self.nonce()).raw

    def produce(self, txs: list[bytes]) -> list[TxResult]:
        """One block of ``txs`` through finalize_block + commit; block time strictly increases."""
        self.time_ns = max(time.time_ns(), self.time_ns + 1)
        height = self.store.height + 1
        outcome = self.app.finalize_block(height, self.time_ns, txs, b"", b"")
        self.app.commit()
        return list(outcome.tx_results)

    def produce_all(self, txs: list[bytes], block: int = BLOCK_TXS) -> int:
        """Produce blocks of ``block`` txs; returns how many failed (non-zero code)."""
        bad = 0
        for i in range(0, len(txs), block):
            bad += sum(r.code != 0 for r in self.produce(txs[i:i + block]))
        return bad

    def stream_records(self, n: int, tag: str,
                       on_block: Callable[[int], None] | None = None) -> dict[str, float]:
        """Build and commit ``n`` records, a block at a time while worker processes seal
        the next blocks (``on_block(txs)`` after each); returns seconds spent waiting for
        txs and applying blocks. FinalizeBlock does not verify the signatures again (the
        builder made them; ``medledger verify`` re-checks every one)."""
        waited = applied = 0.0
        had = len(self.records)
        t = time.perf_counter()
        for chunk in record_txs_stream(self.chain, self.org, self.patients, n, tag):
            t1 = time.perf_counter()
            for _, raw, _, _ in chunk:  # signed here with the org's key: like txs a node's
                self.app.verified.add(sha256(raw), self.org.id)  # CheckTx verified already
            self.blobs.put((h, blob) for _, _, h, blob in chunk)
            bad = self.produce_all([raw for _, raw, _, _ in chunk])
            assert bad == 0, f"{bad} record txs failed"
            self.records.extend(rid for rid, _, _, _ in chunk)
            t2 = time.perf_counter()
            waited, applied, t = waited + t1 - t, applied + t2 - t1, t2
            if on_block is not None:
                on_block(len(chunk))
        assert len(self.records) - had == n, f"built {len(self.records) - had} records, not {n}"
        return {"wait_generate_s": waited, "apply_commit_s": applied}

    def register_patients(self, n: int) -> list[PatientKey]:
        made = [keys.new_identity(f"pat-{len(self.patients) + i}", "patient") for i in range(n)]
        bad = self.produce_all([self.tx("actor.register", register_body(p)) for p in made])
        assert bad == 0, "patient registration failed"
        new = [PatientKey(p.id, p.enc_public) for p in made]
        self.patients.extend(new)
        return new

    def register_practitioner(self, pid: str, role: str = "physician") -> keys.Identity:
        ident = keys.new_identity(pid, "practitioner", {"role": role})
        [r] = self.produce([self.tx("actor.register", register_body(ident, role))])
        assert r.code == 0, r.log
        return ident

    def record_txs(self, n: int, tag: str) -> list[tuple[str, bytes]]:
        return record_txs(self.chain, self.org, self.patients, n, tag, blobs=self.blobs.put)

    def load_records(self, n: int, tag: str) -> float:
        """Build and commit ``n`` records; returns the commit rate (tx/s) of the apply phase."""
        txs = self.record_txs(n, tag)
        t0 = time.perf_counter()
        bad = self.produce_all([raw for _, raw in txs])
        took = time.perf_counter() - t0
        assert bad == 0, f"{bad} record txs failed"
        self.records.extend(rid for rid, _ in txs)
        return n / took
