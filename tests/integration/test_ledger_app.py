"""LedgerApp over a real SQLite store: CheckTx admits, rechecks cheaply, and no signature is
verified twice nor any tx decoded twice (CheckTx -> recheck -> FinalizeBlock); the state
cache stays true."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medledger.core import machine, mempool
from medledger.core import tx as txmod
from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, canonical, sha256
from medledger.crypto.signing import verify as real_verify
from medledger.errors import Forbidden, IntegrityError, Replay, UnknownSigner
from medledger.node.home import org_genesis_entry
from medledger.node.ledger_app import LedgerApp
from medledger.storage.sqlite import SqliteStore

CHAIN = "medledger-app-test"


@pytest.fixture
def world(tmp_path: Path) -> tuple[LedgerApp, keys.Identity]:
    org = keys.new_identity("org-a", "org")
    app = LedgerApp(SqliteStore(tmp_path / "ledger.db"), CHAIN)
    app.init_chain(CHAIN, canonical({"orgs": [org_genesis_entry(org, "A")]}), 0)
    return app, org


def _register(org: keys.Identity, pid: str, nonce: str) -> bytes:
    p = keys.new_identity(pid, "patient")
    body = {"id": pid, "kind": "patient", "sign_pub": b64e(p.sign_public),
            "enc_pub": b64e(p.enc_public)}
    return make_tx(org.id, org.signer(), CHAIN, "actor.register", body, nonce).raw


def test_each_signature_is_verified_once(world: tuple[LedgerApp, keys.Identity],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app, org = world
    calls: list[bytes] = []

    def counting(public: bytes, message: bytes, sig: bytes) -> bool:
        calls.append(sig)
        return real_verify(public, message, sig)

    monkeypatch.setattr(mempool, "verify", counting)
    monkeypatch.setattr(machine, "verify", counting)
    raws = [_register(org, f"pat-{i}", f"{i:016x}") for i in range(5)]
    assert all(app.check_tx(r).code == 0 for r in raws)
    assert len(calls) == 5
    assert all(app.check_tx(r, True).code == 0 for r in raws)  # recheck: no decode, no verify
    assert len(calls) == 5
    outcome = app.finalize_block(1, 10**18, raws, b"", b"")
    app.commit()
    assert [r.code for r in outcome.tx_results] == [0] * 5
    assert len(calls) == 5, "FinalizeBlock verified a signature CheckTx had verified"
    # a tx first met in a block (never CheckTx'd here) is verified there
    fresh = _register(org, "pat-9", "9" * 16)
    app.finalize_block(2, 10**18 + 1, [fresh], b"", b"")
    app.commit()
    assert len(calls) == 6


def test_a_block_that_does_not_follow_on_is_refused(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    """Only the next height is applied (over ABCI a refusal halts the node: better than
    a ledger with a gap or a second block 1)."""
    app, org = world
    raw = _register(org, "pat-1", "1" * 16)
    for height in (0, 2, 7):
        with pytest.raises(IntegrityError, match="does not follow"):
            app.finalize_block(height, 10**18, [raw], b"", b"")
    assert app.height == 0 and app.pending is None
    app.finalize_block(1, 10**18, [raw], b"", b"")
    app.commit()
    with pytest.raises(IntegrityError, match="does not follow this ledger's height 1"):
        app.finalize_block(1, 10**18 + 1, [], b"", b"")
    assert app.height == 1


def test_each_tx_is_decoded_once(world: tuple[LedgerApp, keys.Identity],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    app, org = world
    decoded: list[bytes] = []

    def counting(raw: bytes) -> txmod.Tx:
        decoded.append(raw)
        return txmod.decode_tx(raw)

    monkeypatch.setattr(mempool, "decode_tx", counting)
    monkeypatch.setattr(machine, "decode_tx", counting)
    raws = [_register(org, f"pat-{i}", f"{i:016x}") for i in range(5)]
    assert all(app.check_tx(r).code == 0 for r in raws)
    assert all(app.check_tx(r, True).code == 0 for r in raws)
    assert len(decoded) == 5 and len(app.decoded) == 5
    fresh = _register(org, "pat-9", "9" * 16)  # never CheckTx'd here: decoded in the block
    outcome = app.finalize_block(1, 10**18, [*raws, fresh], b"", b"")
    app.commit()
    assert [r.code for r in outcome.tx_results] == [0] * 6
    assert decoded == [*raws, fresh], "FinalizeBlock decoded a tx CheckTx had decoded"
    assert len(app.decoded) == 0  # committed txs are forgotten


def test_a_node_s_own_tx_is_decoded_once(world: tuple[LedgerApp, keys.Identity],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # precheck (the full transition before broadcasting), then CheckTx, then the block
    app, org = world
    decoded: list[bytes] = []

    def counting(raw: bytes) -> txmod.Tx:
        decoded.append(raw)
        return txmod.decode_tx(raw)

    monkeypatch.setattr(mempool, "decode_tx", counting)
    monkeypatch.setattr(machine, "decode_tx", counting)
    raw = _register(org, "pat-1", "7" * 16)
    assert app.precheck(raw).code == 0 and app.check_tx(raw).code == 0
    outcome = app.finalize_block(1, 10**18, [raw], b"", b"")
    app.commit()
    assert outcome.tx_results[0].code == 0 and decoded == [raw]


def test_recheck_refuses_a_signer_a_block_deactivated(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    # a recheck only looks up the nonce, because commit forgets the admitted txs of a
    # signer whose entry changed: those are judged afresh
    app, org = world
    pat = keys.new_identity("pat-1", "patient")
    body = {"id": "pat-1", "kind": "patient", "sign_pub": b64e(pat.sign_public),
            "enc_pub": b64e(pat.enc_public)}
    reg = make_tx(org.id, org.signer(), CHAIN, "actor.register", body, "e" * 16).raw
    app.finalize_block(1, 10**18, [reg], b"", b"")
    app.commit()
    consent = {"id": "c1", "patient": "pat-1", "decision": "permit"}
    own = make_tx("pat-1", pat.signer(), CHAIN, "consent.put", consent, "f" * 16).raw
    assert app.check_tx(own).code == 0 and app.check_tx(own, True).code == 0
    leave = make_tx(org.id, org.signer(), CHAIN, "actor.deactivate",
                    {"id": "pat-1", "reason": "left"}, "1" * 16).raw
    outcome = app.finalize_block(2, 10**18 + 1, [leave], b"", b"")
    app.commit()
    assert outcome.tx_results[0].code == 0
    assert app.check_tx(own, True).code == UnknownSigner.code
    assert sha256(own) not in app.decoded


def test_recheck_drops_txs_whose_nonce_a_block_used(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    app, org = world
    raw = _register(org, "pat-1", "a" * 16)
    twin = _register(org, "pat-2", "a" * 16)  # same signer and nonce, other content
    assert app.check_tx(raw).code == 0 and app.check_tx(twin).code == 0
    app.finalize_block(1, 10**18, [raw], b"", b"")
    app.commit()
    assert app.check_tx(twin, True).code == Replay.code
    assert app.check_tx(raw).code == Replay.code  # a replay of the committed tx


def test_precheck_runs_policy_check_tx_does_not(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    app, org = world
    consent: dict[str, Any] = {"id": "c1", "patient": "pat-1", "decision": "permit"}
    raw = make_tx(org.id, org.signer(), CHAIN, "consent.put", consent, "b" * 16).raw
    assert app.precheck(raw).code == Forbidden.code  # a consent is the patient's to sign
    assert app.check_tx(raw).code == 0  # the mempool admits it; the block refuses it
    outcome = app.finalize_block(1, 10**18, [raw], b"", b"")
    app.commit()
    assert outcome.tx_results[0].code == Forbidden.code
    assert app.check_tx(raw).code == Replay.code  # its nonce is burnt


def test_state_cache_follows_commits(world: tuple[LedgerApp, keys.Identity],
                                     tmp_path: Path) -> None:
    app, org = world
    assert app.state.get("actor/pat-1") is None  # cached miss
    raw = _register(org, "pat-1", "c" * 16)
    app.finalize_block(1, 10**18, [raw], b"", b"")
    app.commit()
    assert app.state.get("actor/pat-1") == app.store.get("actor/pat-1") is not None
    assert (app.height, app.app_hash) == (app.store.height, app.store.app_hash)
    reopened = LedgerApp(SqliteStore(tmp_path / "ledger.db"))
    assert (reopened.height, reopened.app_hash) == (1, app.app_hash)


def test_a_read_that_straddles_a_commit_is_not_cached(
        world: tuple[LedgerApp, keys.Identity], monkeypatch: pytest.MonkeyPatch) -> None:
    # request handlers on other threads read principals and heads through the cache: a
    # value read from the store just before a commit lands must not outlive the commit
    app, org = world
    raw = _register(org, "pat-1", "e" * 16)
    app.finalize_block(1, 10**18, [raw], b"", b"")
    app.state.cache.invalidate(["actor/pat-1"])  # not cached (FinalizeBlock read it)
    store = app.store

    class CommitDuringRead:
        def get(self, key: str) -> bytes | None:
            value = store.get(key)  # the old value (absent) ...
            app.commit()  # ... and the block commits before the reader caches it
            return value

    monkeypatch.setattr(app.state, "store", CommitDuringRead())
    assert app.state.get("actor/pat-1") is None  # what that reader saw
    monkeypatch.setattr(app.state, "store", store)
    assert app.state.get("actor/pat-1") == store.get("actor/pat-1") is not None


def test_token_requests_read_the_store_sessions_the_cache(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    # a token request names a client nobody has verified yet: flooding it with made-up
    # ids must not fill the ledger's state cache (CheckTx's working set)
    from medledger.errors import Unauthenticated
    from medledger.node.auth import Authenticator, make_assertion
    from medledger.node.ledger_app import _MISSING

    app, org = world
    url = "https://node.example/auth/token"
    auth = Authenticator(app.store, url, 300, sessions_state=app.state)
    stranger = keys.new_identity("made-up-client", "practitioner")
    with pytest.raises(Unauthenticated, match="not registered"):
        auth.exchange(make_assertion(stranger, url), None)
    assert app.state.cache.lookup("actor/made-up-client") is _MISSING
    assert app.state.cache.lookup("org/made-up-client") is _MISSING
    token, _ = auth.exchange(make_assertion(org, url), None)
    assert auth.session(token).actor_id == org.id
    assert app.state.cache.lookup("org/org-a") is not _MISSING  # a live session's read


def test_scan_cache_forgets_a_prefix_when_a_key_under_it_is_written(
        world: tuple[LedgerApp, keys.Identity]) -> None:
    app, org = world
    assert list(app.state.scan("actor/")) == []  # cached (empty)
    assert [k for k, _ in app.state.scan("org/")] == ["org/org-a"]
    app.finalize_block(1, 10**18, [_register(org, "pat-1", "d" * 16)], b"", b"")
    app.commit()
    assert [k for k, _ in app.state.scan("actor/")] == ["actor/pat-1"]
    assert list(app.state.scan("actor/")) == list(app.store.scan("actor/"))
    assert [k for k, _ in app.state.scan("org/")] == ["org/org-a"]


def test_get_many_answers_like_get(world: tuple[LedgerApp, keys.Identity]) -> None:
    # the block's old values for the state digest are read in one query per 500 keys
    app, org = world
    raws = [_register(org, f"pat-{i}", f"{i + 1:016x}") for i in range(600)]
    app.finalize_block(1, 10**18, raws, b"", b"")
    app.commit()
    wanted = [f"actor/pat-{i}" for i in range(0, 1200, 2)] + ["org/org-a", "nope"]
    one_by_one = {k: app.store.get(k) for k in wanted}
    assert app.store.get_many(wanted) == one_by_one
    assert sum(v is not None for v in one_by_one.values()) == 301
    assert app.state.get("actor/pat-0") is not None and app.state.get("nope") is None  # cached
    assert app.state.get_many(wanted) == one_by_one
