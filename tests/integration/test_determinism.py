"""Determinism: the embedded producer and the CometBFT (ABCI) path agree byte for byte.

Hypothesis generates random sequences of txs, valid and invalid — registrations
(including duplicates), ``record.put`` with random versions and previous hashes,
consents signed by the right and the wrong party, governance, replays, txs for another
chain, garbage bytes — cut into blocks with increasing block times. The same blocks run
through

(a) ``SoloProducer.produce`` over a ``LedgerApp`` on SQLite, and
(b) a second ``LedgerApp`` on SQLite behind a real ``AbciServer`` socket, driven the
    way CometBFT drives it: ``InitChain`` (app_state as CometBFT passes it, indented
    JSON), then per block ``CheckTx`` for each tx (fills the verified-signature cache),
    ``FinalizeBlock`` and ``Commit``, all length-prefixed protobuf on the wire.

Both must give the same result codes and app hash for every block, the same stored
block headers and the same final state, key for key.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stg

from medledger.consensus.solo import SoloProducer
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, canonical, sha256
from medledger.node.home import org_genesis_entry
from medledger.node.ledger_app import LedgerApp
from medledger.storage.sqlite import SqliteStore

try:
    from medledger.consensus.abci import AbciServer, FrameDecoder, frame, pb
except ImportError as exc:  # protos not generated
    pytest.skip(f"ABCI protos missing: {exc}", allow_module_level=True)

CHAIN = "medledger-determinism"
T0 = 1_750_000_000 * 10**9
ORGS = [keys.new_identity(f"org-{c}", "org", {"name": f"Org {c}"}) for c in "abc"]
GENESIS_ORGS = [org_genesis_entry(o, o.meta["name"], bytes([i + 1]) * 32)
                for i, o in enumerate(ORGS[:2])]  # org-c is not founding: it may be proposed
PRACS = [keys.new_identity(f"dr-{i}", "practitioner") for i in range(3)]
PATIENTS = [keys.new_identity(f"pat-{i}", "patient") for i in range(3)]
ROLES = ["physician", "nurse", "psychiatrist", "admin-clerk"]
SETUP_ROLES = [(0, "physician"), (0, "nurse"), (1, "psychiatrist")]  # (org index, role)
CATEGORIES = ["vital-signs", "medications", "mental-health", "demographics", "labs"]


def _pub(identity: keys.Identity) -> dict[str, str]:
    return {"sign_pub": b64e(identity.sign_public), "enc_pub": b64e(identity.enc_public)}


@dataclass
class Gen:
    """Turns drawn choices into signed raw txs (remembering bodies for prev hashes)."""

    nonce: int = 0
    last_body: dict[tuple[str, str], dict[str, Any]] | None = None

    def tx(self, signer: keys.Identity, kind: str, body: dict[str, Any],
           chain: str = CHAIN) -> bytes:
        self.nonce += 1
        raw: bytes = make_tx(signer.id, signer.signer(), chain, kind, body,
                             f"{self.nonce:032x}").raw
        return raw


@stg.composite
def tx_sequence(draw: stg.DrawFn) -> list[list[bytes]]:
    gen = Gen(last_body={})
    assert gen.last_body is not None
    emitted: list[bytes] = []
    blocks: list[list[bytes]] = []
    if draw(stg.integers(0, 9)):  # usually: staff and patients registered up front
        setup = [gen.tx(ORGS[i], "actor.register", {"id": p.id, "kind": "practitioner",
                                                    "role": role, **_pub(p)})
                 for p, (i, role) in zip(PRACS, SETUP_ROLES, strict=True)]
        setup += [gen.tx(ORGS[i], "actor.register", {"id": p.id, "kind": "patient", **_pub(p)})
                  for p, i in zip(PATIENTS, (0, 0, 1), strict=True)]
        blocks.append(setup)
    for _ in range(draw(stg.integers(1, 6))):
        block: list[bytes] = []
        for _ in range(draw(stg.integers(0, 8))):
            action = draw(stg.sampled_from([
                "practitioner", "patient", "record", "record", "record", "consent",
                "governance", "replay", "other-chain", "garbage"]))
            org = draw(stg.sampled_from([ORGS[0], ORGS[0], ORGS[1], ORGS[1], ORGS[2]]))
            if action == "practitioner":
                p = draw(stg.sampled_from(PRACS))
                raw = gen.tx(org, "actor.register", {"id": p.id, "kind": "practitioner",
                                                     "role": draw(stg.sampled_from(ROLES)),
                                                     **_pub(p)})
            elif action == "patient":
                p = draw(stg.sampled_from(PATIENTS))
                raw = gen.tx(org, "actor.register", {"id": p.id, "kind": "patient", **_pub(p)})
            elif action == "record":
                patient_id = draw(stg.sampled_from(PATIENTS)).id
                rtype = draw(stg.sampled_from(["Observation", "Condition"]))
                rid = f"r{draw(stg.integers(0, 2))}"
                prior = gen.last_body.get((rtype, rid))
                version = draw(stg.sampled_from([1, 1, 2, 2, 3]))
                prev = "" if version == 1 or prior is None else sha256(canonical(prior)).hex()
                signer = draw(stg.sampled_from([org, *PRACS, *PRACS]))
                body: dict[str, Any] = {
                    "type": rtype, "id": rid, "version": version, "prev": prev,
                    "patient": patient_id, "category": draw(stg.sampled_from(CATEGORIES)),
                    "labels": draw(stg.sampled_from([[], ["PSY"], ["R"]])),
                    "author": None if signer is org else signer.id,
                    "keys": {patient_id: "k", org.id: "k"}, "ct": f"ct{gen.nonce}", "iv": "iv",
                    "commitment": "c"}
                gen.last_body[(rtype, rid)] = body
                raw = gen.tx(signer, "record.put", body)
            elif action == "consent":
                patient = draw(stg.sampled_from(PATIENTS))
                signer = draw(stg.sampled_from([patient, patient, org, *PRACS]))
                raw = gen.tx(signer, "consent.put", {
                    "id": f"c{draw(stg.integers(0, 2))}", "patient": patient.id,
                    "decision": draw(stg.sampled_from(["permit", "deny", "maybe"])),
                    "categories": draw(stg.sampled_from([[], ["labs"], ["nope"]])),
                    "labels": [], "orgs": [ORGS[1].id], "actors": [],
                    "start": None, "end": draw(stg.sampled_from([None, 1, 2_000_000_000]))})
            elif action == "governance":
                if draw(stg.booleans()):
                    raw = gen.tx(org, "org.propose", {"org": org_genesis_entry(
                        ORGS[2], "Org c", bytes([3]) * 32)})
                else:
                    raw = gen.tx(org, "org.approve", {"org_id": ORGS[2].id})
            elif action == "replay" and emitted:
                raw = draw(stg.sampled_from(emitted))
            elif action == "other-chain":
                raw = gen.tx(org, "actor.register", {"id": "x", "kind": "patient",
                                                     **_pub(PATIENTS[0])}, chain="elsewhere")
            else:
                raw = draw(stg.binary(min_size=0, max_size=40))
            emitted.append(raw)
            block.append(raw)
        blocks.append(block)
    return blocks


# --------------------------------------------------------------------------- path (a)


def run_solo(db: Path, blocks: list[list[bytes]]) -> tuple[list[tuple[list[int], bytes]],
                                                           LedgerApp]:
    app = LedgerApp(SqliteStore(db), CHAIN)
    app.init_chain(CHAIN, canonical({"orgs": GENESIS_ORGS}), T0)
    times = iter(T0 + (i + 1) * 1_000_000_007 for i in range(len(blocks)))
    producer = SoloProducer(app, clock=lambda: next(times))
    out = []
    for txs in blocks:
        _, results = producer.produce(txs)
        out.append(([r.code for r in results], app.store.app_hash))
    return out, app


# --------------------------------------------------------------------------- path (b)


class AbciClient:
    """Speaks to an ``AbciServer`` over its socket, like CometBFT's consensus connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.pending: list[bytes] = []

    async def call(self, req: pb.Request) -> pb.Response:
        self.writer.write(frame(req.SerializeToString()))
        self.writer.write(frame(pb.Request(flush=pb.RequestFlush()).SerializeToString()))
        await self.writer.drain()
        while len(self.pending) < 2:
            chunk = await self.reader.read(65536)
            assert chunk, "ABCI server closed the connection"
            self.pending += self.decoder.feed(chunk)
        resp: pb.Response = pb.Response.FromString(self.pending[0])
        flush = pb.Response.FromString(self.pending[1])
        del self.pending[:2]
        assert flush.WhichOneof("value") == "flush"
        return resp


def _ts(time_ns: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp
    return Timestamp(seconds=time_ns // 10**9, nanos=time_ns % 10**9)


async def run_abci(db: Path, blocks: list[list[bytes]]
                   ) -> tuple[list[tuple[list[int], bytes]], LedgerApp]:
    app = LedgerApp(SqliteStore(db), CHAIN)
    server = AbciServer(app, port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        client = AbciClient(reader, writer)
        app_state = json.dumps({"orgs": GENESIS_ORGS}, indent=2).encode()  # not canonical
        init = await client.call(pb.Request(init_chain=pb.RequestInitChain(
            chain_id=CHAIN, app_state_bytes=app_state, time=_ts(T0), initial_height=1)))
        assert init.init_chain.app_hash == app.store.app_hash
        out = []
        for height, txs in enumerate(blocks, start=1):
            for raw in txs:  # the mempool's CheckTx (fills the verified cache)
                await client.call(pb.Request(check_tx=pb.RequestCheckTx(tx=raw)))
            t = T0 + height * 1_000_000_007
            fin = await client.call(pb.Request(finalize_block=pb.RequestFinalizeBlock(
                txs=txs, height=height, time=_ts(t), hash=sha256(b"%d" % height))))
            await client.call(pb.Request(commit=pb.RequestCommit()))
            codes = [r.code for r in fin.finalize_block.tx_results]
            assert fin.finalize_block.app_hash == app.store.app_hash
            out.append((codes, bytes(fin.finalize_block.app_hash)))
        info = await client.call(pb.Request(info=pb.RequestInfo()))
        assert info.info.last_block_height == len(blocks)
        writer.close()
        assert server.fatal_error is None
        return out, app
    finally:
        await server.stop()


# --------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tx_sequence())
def test_solo_and_abci_paths_agree(blocks: list[list[bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        solo, solo_app = run_solo(Path(tmp) / "solo.db", blocks)
        abci, abci_app = asyncio.run(run_abci(Path(tmp) / "abci.db", blocks))
        try:
            for height, (a, b) in enumerate(zip(solo, abci, strict=True), start=1):
                assert a == b, f"block {height}: solo {a} != abci {b}"
            for height in range(1, len(blocks) + 1):
                assert solo_app.store.block(height) == abci_app.store.block(height)
            assert dict(solo_app.store.state_items()) == dict(abci_app.store.state_items())
            assert solo_app.store.meta("genesis") == abci_app.store.meta("genesis")
        finally:
            solo_app.store.close()
            abci_app.store.close()


def test_generated_sequences_exercise_valid_and_invalid_txs() -> None:
    """Guard against a generator that only ever makes failing (or only passing) txs."""
    codes: set[int] = set()

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(tx_sequence())
    def collect(blocks: list[list[bytes]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out, app = run_solo(Path(tmp) / "solo.db", blocks)
            app.store.close()
        for block_codes, _ in out:
            codes.update(block_codes)

    collect()
    assert 0 in codes and len(codes - {0}) >= 3, codes
