"""The mempool's admission rule: what CheckTx must decide, and nothing more.

A tx may wait in the mempool (and be gossiped to every validator) if it is well
formed, for this chain, signed by a known signer (an organisation that is an active
member, or a registered actor not deactivated) with a valid signature, not larger than the mempool
allows, and its ``(signer, nonce)`` has not been used by a committed tx. Everything
else (policy, version chains, the body of each kind) is judged once, by the state
machine, when the tx is in a block: a tx that passes here and fails there gets a
non-zero result code in the block and burns its nonce, exactly as before.

Why not run the full state transition in CheckTx: CometBFT calls CheckTx on every
validator for every tx (gossip), and again for every tx still waiting after each block
(recheck). The full transition there cost four times the block's own work, plus the
rechecks, for a verdict the block recomputes anyway. What the mempool needs is only
protection from spam and replays, which these checks give.

``admit`` checks a new tx (``decode`` then ``admit_tx``, for a caller that keeps the
decoded tx for its block); ``still_admissible`` re-judges an admitted one after a block
(recheck) from the ``Admitted`` it returned, without decoding or verifying again.
Pure: the state reader and the set of already-verified tx hashes are passed in.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from medledger.core import state as st
from medledger.core.tx import MAX_TX_BYTES, Tx, decode_tx
from medledger.crypto.canonical import b64d
from medledger.crypto.signing import verify
from medledger.errors import BadSignature, Replay, TooLarge, UnknownSigner

__all__ = ["Admitted", "admit", "admit_tx", "decode", "nonce_key", "still_admissible"]


@dataclass(frozen=True)
class Admitted:
    """What the mempool remembers of an admitted tx, enough to re-judge it cheaply."""

    tx_hash: bytes
    signer: str
    nonce: str
    kind: str
    verified: bool  # True if this call verified the signature (the cache did not know it)


def nonce_key(signer: str, nonce: str) -> str:
    """The state key that marks ``signer``'s ``nonce`` as used (``core.state`` layout)."""
    return f"n/{signer}/{nonce}"


def decode(raw: bytes, max_tx_bytes: int = MAX_TX_BYTES) -> Tx:
    """The tx, if the mempool takes txs of its size and it is well formed (raises
    ``TooLarge`` / ``InvalidInput``)."""
    if len(raw) > max_tx_bytes:
        raise TooLarge(f"transaction of {len(raw)} bytes exceeds the mempool's "
                       f"{max_tx_bytes}-byte limit")
    return decode_tx(raw)


def admit(state: st.StateReader, raw: bytes, chain: str, verified: Container[bytes] = (),
          max_tx_bytes: int = MAX_TX_BYTES) -> Admitted:
    """Raise the ``MedledgerError`` the tx is refused with, else return what was admitted.

    ``verified`` holds hashes of txs whose signatures are already known good (checked
    earlier by this node); their signatures are not checked again.
    """
    return admit_tx(state, decode(raw, max_tx_bytes), chain, verified)


def admit_tx(state: st.StateReader, tx: Tx, chain: str, verified: Container[bytes] = ()
             ) -> Admitted:
    """``admit`` for a tx already decoded (by ``decode``)."""
    if tx.chain != chain:
        raise Replay(f"tx is for chain {tx.chain!r}, this is {chain!r}")
    signer = _active_signer(state, tx.signer)
    fresh = tx.hash not in verified
    if fresh and not _signature_ok(signer, tx):
        raise BadSignature(f"bad signature on tx {tx.hash_hex[:16]} by {tx.signer}")
    _unused_nonce(state, tx.signer, tx.nonce)
    return Admitted(tx.hash, tx.signer, tx.nonce, tx.kind, fresh)


def still_admissible(state: st.StateReader, admitted: Admitted,
                     signer_unchanged: bool = False) -> None:
    """Recheck after a block: the signer is still known and active, the nonce unused.

    ``signer_unchanged``: the caller knows no block since admission wrote the signer's
    entry (it forgets the admitted txs of signers a block changed), so the signer's
    verdict stands and only the nonce is looked up."""
    if not signer_unchanged:
        _active_signer(state, admitted.signer)
    _unused_nonce(state, admitted.signer, admitted.nonce)


def _active_signer(state: st.StateReader, signer_id: str) -> dict[str, Any]:
    signer = st.principal(state, signer_id)
    if signer is None:
        raise UnknownSigner(f"unknown signer {signer_id!r}")
    if signer["kind"] == "org" and signer["status"] != "active":
        raise UnknownSigner(f"organisation {signer_id!r} is not an active member")
    if not st.is_active(signer):
        raise UnknownSigner(f"{signer_id} was deactivated; its key signs nothing any more")
    return signer


def _signature_ok(signer: dict[str, Any], tx: Tx) -> bool:
    return verify(b64d(signer["sign_pub"], field="sign_pub"), tx.signing_bytes, tx.sig)


def _unused_nonce(state: st.StateReader, signer: str, nonce: str) -> None:
    if state.get(nonce_key(signer, nonce)) is not None:
        raise Replay(f"nonce {nonce} of {signer} was already used (replayed tx)")
