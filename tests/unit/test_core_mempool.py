"""core.mempool: what CheckTx admits, and that it agrees with the state machine.

The admission rule judges chain id, signer, signature, size and nonce only; whatever
it refuses the machine refuses with the same code, and a policy violation it admits
is refused by the machine when the tx is in a block.
"""

from __future__ import annotations

import hashlib

import pytest
from nacl.public import PrivateKey

from medledger.core import machine, mempool
from medledger.core import state as st
from medledger.core.machine import BlockInput
from medledger.core.tx import make_tx
from medledger.crypto.canonical import b64e
from medledger.crypto.signing import Signer
from medledger.errors import MedledgerError

CHAIN = "medledger-test"
OK, INVALID, BADSIG, UNKNOWN, REPLAY, FORBIDDEN, TOO_LARGE = 0, 2, 3, 4, 5, 7, 12


def _seed(name: str) -> bytes:
    return hashlib.sha256(b"seed:" + name.encode()).digest()


def _keys(name: str) -> dict[str, str]:
    enc = PrivateKey(hashlib.sha256(b"enc:" + name.encode()).digest()).public_key
    return {"sign_pub": b64e(Signer(_seed(name)).public_key), "enc_pub": b64e(bytes(enc))}


@pytest.fixture
def state() -> st.MemoryState:
    s = st.MemoryState()
    s.apply(machine.genesis_writes({"orgs": [{"id": "org-a", "name": "A", **_keys("org-a")}]}))
    return s


def _tx(signer: str, kind: str, body: dict[str, object], nonce: str, *,
        chain: str = CHAIN, key: str | None = None) -> bytes:
    return make_tx(signer, Signer(_seed(key or signer)), chain, kind, body, nonce).raw


def _code(state: st.MemoryState, raw: bytes, **kw: object) -> int:
    try:
        mempool.admit(state, raw, CHAIN, **kw)  # type: ignore[arg-type]
    except MedledgerError as err:
        return err.code
    return OK


def _block_code(state: st.MemoryState, raw: bytes) -> int:
    block = BlockInput(CHAIN, 1, 10**18, (raw,), b"", b"")
    return machine.apply_block(state, block).results[0].code


PATIENT = {"id": "pat-1", "kind": "patient", **_keys("pat-1")}
CONSENT = {"id": "c1", "patient": "pat-1", "decision": "permit"}


@pytest.mark.parametrize(("what", "raw", "code"), [
    ("good", _tx("org-a", "actor.register", PATIENT, "0" * 16), OK),
    ("other chain", _tx("org-a", "actor.register", PATIENT, "0" * 16, chain="x"), REPLAY),
    ("unknown signer", _tx("mallory", "actor.register", PATIENT, "0" * 16), UNKNOWN),
    ("bad signature", _tx("org-a", "actor.register", PATIENT, "0" * 16, key="mallory"),
     BADSIG),
    ("not a tx", b'{"kind": "record.put"}', INVALID),
    ("not JSON", b"\xff\x00", INVALID),
])
def test_admission_agrees_with_the_machine(state: st.MemoryState, what: str, raw: bytes,
                                           code: int) -> None:
    assert _code(state, raw) == code, what
    assert _block_code(state, raw) == code, what


def test_policy_is_judged_in_the_block_not_in_the_mempool(state: st.MemoryState) -> None:
    # org-a may not sign a patient's consent: admitted (known signer, good signature),
    # refused by the state transition with FORBIDDEN
    raw = _tx("org-a", "consent.put", CONSENT, "1" * 16)
    assert _code(state, raw) == OK
    assert _block_code(state, raw) == FORBIDDEN
    assert machine.check_tx(state, raw, CHAIN, 1, 10**18).code == FORBIDDEN


def test_used_nonce_is_refused_and_recheck_sees_it(state: st.MemoryState) -> None:
    raw = _tx("org-a", "actor.register", PATIENT, "2" * 16)
    admitted = mempool.admit(state, raw, CHAIN)
    assert admitted.verified and (admitted.signer, admitted.nonce) == ("org-a", "2" * 16)
    mempool.still_admissible(state, admitted)
    state.apply(machine.apply_block(state, BlockInput(CHAIN, 1, 10**18, (raw,), b"",
                                                      b"")).writes)
    assert _code(state, raw) == REPLAY
    with pytest.raises(MedledgerError) as err:
        mempool.still_admissible(state, admitted)
    assert err.value.code == REPLAY


def test_verified_cache_skips_the_signature_check(state: st.MemoryState) -> None:
    forged = _tx("org-a", "actor.register", PATIENT, "3" * 16, key="mallory")
    assert _code(state, forged) == BADSIG
    # a hash in the cache is trusted (the cache only ever holds txs verified before)
    h = hashlib.sha256(forged).digest()
    admitted = mempool.admit(state, forged, CHAIN, verified={h})
    assert not admitted.verified


def test_size_limit(state: st.MemoryState) -> None:
    raw = _tx("org-a", "actor.register", PATIENT, "4" * 16)
    assert _code(state, raw, max_tx_bytes=len(raw) - 1) == TOO_LARGE
    assert _code(state, raw, max_tx_bytes=len(raw)) == OK
